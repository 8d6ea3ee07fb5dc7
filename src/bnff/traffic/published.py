"""The papers' whole-network traffic figures and ours next to them (``bnff traffic --reproduce``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bnff.models import MODELS
from bnff.traffic.analysis import compare
from bnff.traffic.assumptions import Assumptions


@dataclass(frozen=True)
class Published:
    """One published traffic reduction.

    Attributes:
        model: bnff model name.
        image_size: the network's standard input size (pixels).
        source: where the figure is from.
        reduction: published change of off-chip traffic relative to unfused training (-0.33 = -33%);
            for "up to" figures, the bound.
        setting: what the paper measured or modelled.
    """

    model: str
    image_size: int
    source: str
    reduction: float
    setting: str


PUBLISHED = (
    Published("resnet50", 224, "seed 000", -0.33, "traffic model, Conv+BN+ReLU fusion with recompute, V100"),
    Published("inception_v3", 299, "seed 000", -0.22, "traffic model, Conv+BN+ReLU fusion with recompute, V100"),
    Published("densenet121", 224, "seed 000", -0.31, "traffic model, Conv+BN+ReLU fusion with recompute, V100"),
    Published("resnet50", 224, "seeds 001/004", -0.19, "'memory access up to about 19% lower', Caffe on Skylake"),
    Published("densenet121", 224, "seeds 001/004", -0.19, "'memory access up to about 19% lower', Caffe on Skylake"),
)

REPRODUCE_BATCH = 32
"""Mini-batch of the reproduction (seed 002 trains with batch 32; seeds 000/001/004 do not say
theirs in the text we have). Traffic ratios hardly depend on it: weights are a few percent."""


def reproduce(batch: int = REPRODUCE_BATCH, assumptions: Assumptions | None = None) -> list[dict]:
    """Our whole-training traffic reductions next to each ``PUBLISHED`` figure.

    Args:
        batch: mini-batch size.
        assumptions: the model's assumptions (default ``Assumptions()``: fp32, convolutions' own
            traffic counted, nothing reused on chip).
    Returns:
        One dict per published figure: ``model``, ``source``, ``published``, ``bnff``, ``fused``
        (fractional changes of total off-chip bytes vs ``unfused``), ``closest`` (the scheme
        nearer the published figure), ``difference_pp`` (ours minus published at the closest
        scheme, percentage points) and ``setting``.
    """
    a = assumptions or Assumptions()
    ours: dict[str, dict[str, float]] = {}
    rows = []
    for p in PUBLISHED:
        if p.model not in ours:
            with torch.device("meta"):
                model = MODELS[p.model]()
            res = compare(model, (batch, 3, p.image_size, p.image_size), dtype=None, assumptions=a)
            base = res["unfused"].summary()["total_bytes"]
            ours[p.model] = {s: res[s].summary()["total_bytes"] / base - 1 for s in ("bnff", "fused")}
        o = ours[p.model]
        closest = min(o, key=lambda s: abs(o[s] - p.reduction))
        rows.append({"model": p.model, "source": p.source, "published": p.reduction, "bnff": o["bnff"],
                     "fused": o["fused"], "closest": closest,
                     "difference_pp": 100 * (o[closest] - p.reduction), "setting": p.setting})
    return rows


__all__ = ["PUBLISHED", "Published", "REPRODUCE_BATCH", "reproduce"]
