"""CP decomposition of trained convolution weights (thesis section 2.2; Lebedev et al. 2015).

A KxK convolution's weight W[C_out, C_in, Kh, Kw] of CP rank R is the sum of R outer products
``lambda_r * a_r (x) b_r (x) c_r (x) d_r``; the factor matrices are the weights of the four layers
the tiling model uses (``bnff.tiling.layers``): 1x1 C_in -> R (B), depthwise Kh x 1 (C), depthwise
1 x Kw (D), 1x1 R -> C_out (A, scaled by lambda). The decomposition is ``tensorly``'s ``parafac``
(alternating least squares), run on the weights of a checkpoint ``bnff train`` wrote; the traffic
model needs only the shapes and never runs it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def rank_of(spec: float | int, c_in: int, c_out: int) -> int:
    """A rank, or a fraction (< 1) of min(C_in, C_out), as an integer >= 1."""
    r = spec * min(c_in, c_out) if isinstance(spec, float) and spec < 1 else spec
    return max(1, int(r))


def decompose(weight: torch.Tensor, rank: int, n_iter_max: int = 200, seed: int = 0) -> tuple[list[np.ndarray], float]:
    """CP factors of a (C_out, C_in, Kh, Kw) weight at ``rank`` and the relative reconstruction
    error ||W - W_cp|| / ||W|| (Frobenius), in float64.

    Returns:
        ([A (C_out, R) scaled by the weights lambda, B (C_in, R), C (Kh, R), D (Kw, R)], error).
    """
    import tensorly as tl
    from tensorly.decomposition import parafac

    w = weight.detach().to(torch.float64).cpu().numpy()
    cp = parafac(tl.tensor(w), rank=rank, n_iter_max=n_iter_max, init="random", random_state=seed,
                 normalize_factors=True)
    weights, factors = cp
    a = factors[0] * weights[None, :]
    approx = tl.cp_to_tensor((np.ones(rank), [a, *factors[1:]]))
    return [a, *factors[1:]], float(np.linalg.norm(w - approx) / np.linalg.norm(w))


def decompose_checkpoint(path: str | Path, rank: float | int) -> list[dict]:
    """Every standard KxK convolution weight (K > 1, not depthwise) of a ``bnff train`` checkpoint,
    decomposed: ``[{"name", "shape", "rank", "relative_error"}]``.

    Raises:
        ValueError: the file is not a ``bnff train`` checkpoint (no ``state_dict``).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ValueError(f"{path} is not a checkpoint written by bnff train (no 'state_dict')")
    rows = []
    for name, w in state["state_dict"].items():
        if not name.endswith("weight") or w.dim() != 4 or w.shape[1] == 1 or w.shape[2] * w.shape[3] == 1:
            continue
        r = rank_of(rank, w.shape[1], w.shape[0])
        _, err = decompose(w, r)
        rows.append({"name": name[: -len(".weight")], "shape": list(w.shape), "rank": r, "relative_error": err})
    return rows


__all__ = ["decompose", "decompose_checkpoint", "rank_of"]
