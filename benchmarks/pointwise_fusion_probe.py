"""Issue 17's first question, measured before building anything into bnff: does a 1x1 convolution
that takes its BN apply + ReLU as pre-processing and reduces the next BN's statistics in its
epilogue, executed in row blocks that stay in cache, beat what bnff runs today (the apply sweep,
the library convolution, the statistics sweep)?

    .venv/bin/python benchmarks/pointwise_fusion_probe.py [--repeats 9] [--json PATH]

A probe, not part of bnff: the blocked forward is a few dozen lines of C++ built here with
``load_inline`` (ATen's ``at::vec::Vectorized`` at this CPU's ATen capability level, ATen's
``at::mm_out`` as the GEMM of each block, blocks spread over threads by ``at::parallel_for``).
For ResNet-50's 1x1 shapes at batch 16 (channels_last, M = N*H*W rows of C_in channels) it times,
interleaved in one process:

* ``conv``: the library 1x1 convolution alone (the floor);
* ``bnff``: bnff's ``cpu`` backend apply sweep, the library convolution, bnff's statistics sweep;
* ``fused/B``: for each block of B rows, apply + ReLU into a per-thread buffer, ``mm_out`` into
  the output rows, and the per-channel sums of those rows while they are in cache.

Each result is checked against float64. Reports the lower quartile of ``--repeats`` rounds.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load_inline

from bnff.atomic import write_json
from bnff.machine import cpu_info, describe
from bnff.ops.backends import cpu

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
using at::Tensor;
using Vec = at::vec::Vectorized<float>;
using BVec = at::vec::Vectorized<at::BFloat16>;
constexpr int64_t L = 2 * Vec::size();  // one bfloat16 vector = two float vectors

static inline void ld(const float* p, Vec& a, Vec& b) { a = Vec::loadu(p); b = Vec::loadu(p + Vec::size()); }
static inline void ld(const at::BFloat16* p, Vec& a, Vec& b) { std::tie(a, b) = at::vec::convert_bfloat16_float(BVec::loadu(p)); }
static inline void st(float* p, Vec a, Vec b) { a.store(p); b.store(p + Vec::size()); }
static inline void st(at::BFloat16* p, Vec a, Vec b) { at::vec::convert_float_bfloat16(a, b).store(p); }

// a = relu(z * scale + shift), rows x K (K a multiple of L)
template <typename T>
void apply_block(const T* z, T* a, const float* sc, const float* sh, int64_t rows, int64_t K) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; k += L) {
      Vec v0, v1;
      ld(z + r * K + k, v0, v1);
      st(a + r * K + k,
         at::vec::maximum(at::vec::fmadd(v0, Vec::loadu(sc + k), Vec::loadu(sh + k)), Vec(0.f)),
         at::vec::maximum(at::vec::fmadd(v1, Vec::loadu(sc + k + Vec::size()), Vec::loadu(sh + k + Vec::size())), Vec(0.f)));
    }
}
// sum y and y^2 over rows, per channel, into out[0:N] and out[N:2N] (double)
template <typename T>
void sums_block(const T* y, int64_t rows, int64_t N, double* out) {
  for (int64_t n = 0; n < N; n += L) {
    Vec s0(0.f), s1(0.f), q0(0.f), q1(0.f);
    for (int64_t r = 0; r < rows; ++r) {
      Vec v0, v1;
      ld(y + r * N + n, v0, v1);
      s0 = s0 + v0; s1 = s1 + v1; q0 = at::vec::fmadd(v0, v0, q0); q1 = at::vec::fmadd(v1, v1, q1);
    }
    float b[4][Vec::size()];
    s0.store(b[0]); s1.store(b[1]); q0.store(b[2]); q1.store(b[3]);
    for (int64_t i = 0; i < Vec::size(); ++i) {
      out[n + i] += b[0][i]; out[n + Vec::size() + i] += b[1][i];
      out[N + n + i] += b[2][i]; out[N + n + Vec::size() + i] += b[3][i];
    }
  }
}
template <typename T>
std::vector<Tensor> run(const Tensor& z, const Tensor& sc, const Tensor& sh, const Tensor& wt, int64_t block) {
  const int64_t M = z.size(0), K = z.size(1), N = wt.size(1), blocks = (M + block - 1) / block;
  Tensor y = at::empty({M, N}, z.options());
  Tensor acc = at::zeros({at::get_num_threads(), 2 * N}, z.options().dtype(at::kDouble));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    Tensor a = at::empty({block, K}, z.options());
    double* out = acc.data_ptr<double>() + at::get_thread_num() * 2 * N;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * block, rows = std::min(M, r0 + block) - r0;
      apply_block(z.data_ptr<T>() + r0 * K, a.data_ptr<T>(), sc.data_ptr<float>(), sh.data_ptr<float>(), rows, K);
      Tensor yb = y.narrow(0, r0, rows);
      at::mm_out(yb, a.narrow(0, 0, rows), wt);
      sums_block(y.data_ptr<T>() + r0 * N, rows, N, out);
    }
  });
  return {y, acc.sum(0)};
}
// y = relu(z * scale + shift) @ wt in row blocks, and the per-channel sums (sum y, sum y^2) of y
std::vector<Tensor> fused_pointwise(Tensor z, Tensor sc, Tensor sh, Tensor wt, int64_t block) {
  TORCH_CHECK(z.is_contiguous() && z.size(1) % L == 0 && wt.size(1) % L == 0, "probe: contiguous, channels % 32 == 0");
  return z.scalar_type() == at::kFloat ? run<float>(z, sc, sh, wt, block) : run<at::BFloat16>(z, sc, sh, wt, block);
}
"""

CAPABILITY_FLAGS = {  # ATen's vec headers pick their specializations from these macros
    "AVX512": ["-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mfma", "-mavx2"],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2", "-mavx2", "-mfma"],
}
# ResNet-50's 1x1 convolutions that take a BN apply (bottleneck conv1 and conv3), batch 16
SHAPES = ((16, 56, 64, 256), (16, 56, 256, 64), (16, 28, 128, 512), (16, 28, 512, 128),
          (16, 14, 256, 1024), (16, 14, 1024, 256), (16, 7, 512, 2048), (16, 7, 2048, 512))
BLOCKS = (256, 1024, 4096)


def build():
    cap = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", *CAPABILITY_FLAGS.get(cap, [])]
    return load_inline(f"bnff_pointwise_probe_{cap.lower()}", cpp_sources=SOURCE, functions=["fused_pointwise"],
                       extra_cflags=flags, verbose=False), cap


def measure(ext, n: int, hw: int, cin: int, cout: int, dtype: torch.dtype, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    z = torch.randn(n, cin, hw, hw, generator=gen).to(dtype).contiguous(memory_format=cl)
    w = (torch.randn(cout, cin, 1, 1, generator=gen) / cin ** 0.5).to(dtype).contiguous(memory_format=cl)
    mean, var = torch.randn(cin, generator=gen) * 0.1, torch.rand(cin, generator=gen) + 0.5
    gamma, beta = torch.rand(cin, generator=gen) + 0.5, torch.randn(cin, generator=gen) * 0.1
    f1 = gamma * torch.rsqrt(var + 1e-5)
    scale, shift = f1, beta - f1 * mean
    z2 = z.permute(0, 2, 3, 1).reshape(-1, cin)  # channels_last rows: a view, no copy
    wt = w.reshape(cout, cin).t()

    # float64 truth for the output and its sums
    a64 = torch.relu(z.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))
    y64 = F.conv2d(a64, w.double())
    tol = 1e-4 if dtype == torch.float32 else 3e-2

    def bnff_path():
        a = cpu.apply([[z]], [mean], [f1], [beta], [], "relu", dtype)
        y = F.conv2d(a, w)
        return y, cpu.channel_stats(y)

    def check(y, sums_or_stats, fused: bool) -> None:
        err = ((y.double() - y64.reshape(y.shape) if fused else y.double() - y64).norm() / y64.norm()).item()
        assert err < tol, err
        if fused:
            mean_y = sums_or_stats[:cout] / (y.numel() // cout)
            assert torch.allclose(mean_y, y64.mean((0, 2, 3)), rtol=tol, atol=tol * y64.abs().mean().item())

    y, st = bnff_path()
    check(y, st, fused=False)
    calls = {"conv": lambda: F.conv2d(z, w), "bnff": bnff_path}
    for b in BLOCKS:
        out = ext.fused_pointwise(z2, scale, shift, wt, b)
        check(out[0].reshape(n, hw, hw, cout).permute(0, 3, 1, 2), out[1], fused=True)
        calls[f"fused/{b}"] = (lambda b=b: ext.fused_pointwise(z2, scale, shift, wt, b))
    times = {k: [] for k in calls}
    for f in calls.values():
        f(), f()
    for _ in range(repeats):
        for k, f in calls.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    ms = {k: sorted(v)[len(v) // 4] * 1e3 for k, v in times.items()}
    best = min((k for k in ms if k.startswith("fused")), key=ms.get)
    return {"shape": [n, cin, hw, hw], "cout": cout, "dtype": str(dtype).removeprefix("torch."), "ms": ms,
            "best_fused": best, "bnff_over_fused": ms["bnff"] / ms[best],
            "overhead_removed": (ms["bnff"] - ms[best]) / max(ms["bnff"] - ms["conv"], 1e-9)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    ext, cap = build()
    info = cpu_info()
    print(describe(info), f"| ATen capability {cap} | {torch.get_num_threads()} threads")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for n, hw, cin, cout in SHAPES:
            r = measure(ext, n, hw, cin, cout, dtype, args.repeats)
            rows.append(r)
            ms = r["ms"]
            print(f"{r['dtype']:8s} {cin:4d}->{cout:4d} at {hw:3d}x{hw:<3d} conv {ms['conv']:6.2f}  bnff {ms['bnff']:6.2f}  "
                  + "  ".join(f"{k} {v:6.2f}" for k, v in ms.items() if k.startswith("fused"))
                  + f"  bnff/fused {r['bnff_over_fused']:.2f}  overhead removed {r['overhead_removed']:+.0%}", flush=True)
    for dtype in ("float32", "bfloat16"):
        sub = [r for r in rows if r["dtype"] == dtype]
        tot = {k: sum(r["ms"][k] if k != "fused" else r["ms"][r["best_fused"]] for r in sub) for k in ("conv", "bnff", "fused")}
        print(f"{dtype}: sum over shapes conv {tot['conv']:.1f} ms, bnff {tot['bnff']:.1f} ms, fused (best block each) "
              f"{tot['fused']:.1f} ms; overhead removed {(tot['bnff'] - tot['fused']) / (tot['bnff'] - tot['conv']):+.0%}")
    if args.json:
        write_json(args.json, {"cpu": info, "aten_capability": cap, "threads": torch.get_num_threads(),
                               "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
