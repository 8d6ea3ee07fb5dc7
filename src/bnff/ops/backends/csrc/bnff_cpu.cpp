// bnff's fused CPU sweeps, forward half: channel_stats, apply, the per-channel vector kernels and the
// registration of every op's schema (bnff_sweeps.h says what the kernels share; bnff_backward.cpp has
// grad_stats and input_grad, bnff_lone.cpp the lone-term backward).
#include "bnff_sweeps.h"

#include <torch/library.h>

namespace bnff_cpu {

// ---- channel_stats ------------------------------------------------------------------------------
// Welford/Chan: each block (256 rows of a channels_last tile, or a run of an NCHW plane, in
// cache) gives its mean and M2 = sum (x - mean_b)^2 by two passes; blocks merge in double with
// Chan's formula (Moments). As accurate as ATen's var_mean; the raw one-sweep sum x^2 / m - mu^2,
// even on shifted data, is ~10x worse.

// A block's float32 mean mb, then the sums of d = x - mb and d^2 over it (centered: nothing
// cancels; sum d corrects mb's rounding). The channels_last walk (tile_moments) keeps a mean per
// lane (lanes are channels); an NCHW run (block_sums) one mean for all lanes (one channel's plane).
// load(i) is the run's i-th vector, zero in the lanes it does not hold; keep(d) zeroes those lanes.
struct BlockSums {
  V mb, sd, m2;
};
template <typename Load, typename Keep>
BNFF_INLINE BlockSums block_sums(int64_t nv, float count, Load load, Keep keep) {
  V sum(0.f);
  for (int64_t i = 0; i < nv; ++i) sum += load(i);
  const V mb(static_cast<float>(lane_sum(sum) / count));
  V sd(0.f), m2(0.f);
  for (int64_t i = 0; i < nv; ++i) {
    const V d = keep(i, load(i) - mb);
    sd += d;
    m2 += d * d;
  }
  return {mb, sd, m2};
}

// The block's mean mb per lane, then the sums of d = x - mb and d^2, for nv <= NV vectors of
// channels side by side (the last of w lanes) down nb rows of stride C from p; their lanes go to
// out (mb), out + C (sum d) and out + 2C (sum d^2). The tile functions take a compile-time NV, which
// keeps their arrays in registers, and run its first nv (one predictable test per vector): one
// instantiation per tile width instead of one per count, which had doubled the build's time.
template <int64_t NV, typename T, typename Wd>
BNFF_INLINE void tile_moments(const T* p, int64_t C, int64_t nb, Wd w, int64_t nv, float* out) {
  const auto width = [&](int64_t j) BNFF_LAMBDA { return j == NV - 1 ? int64_t(w) : W; };
  V mb[NV], sd[NV], m2[NV];
  for (int64_t j = 0; j < NV; ++j) if (j < nv) mb[j] = sd[j] = m2[j] = V(0.f);
  for (int64_t r = 0; r < nb; ++r)
    for (int64_t j = 0; j < NV; ++j) if (j < nv) mb[j] += ld(p + r * C + j * W, width(j));
  for (int64_t j = 0; j < NV; ++j) if (j < nv) mb[j] = mb[j] / V(static_cast<float>(nb));
  for (int64_t r = 0; r < nb; ++r)
    for (int64_t j = 0; j < NV; ++j) if (j < nv) {
      const V d = ld(p + r * C + j * W, width(j)) - mb[j];
      sd[j] += d;
      m2[j] += d * d;
    }
  for (int64_t j = 0; j < NV; ++j) if (j < nv) {
    st(out + j * W, mb[j], width(j));
    st(out + C + j * W, sd[j], width(j));
    st(out + 2 * C + j * W, m2[j], width(j));
  }
}

template <typename T>
void stats_cl(const T* x, const Geo& g, double* mean, double* var) {
  // Per block of rows: tile_moments over tiles of kTile vectors (or of one vector, a walk down each
  // vector's column, where walk_tiles says no); the second pass finds the tile's column in cache.
  // Within a chunk, blocks add up in double around the chunk's first block mean (K):
  // S = sum nb (mean_b - K), Q = sum M2_b + nb (mean_b - K)^2; chunks merge with Chan's formula.
  // One chunk per thread: the chunks' Chan merges (nc x C, scalar, in double) cost more than the
  // sweep itself for many channels of few rows (2048 channels of 7 x 7 maps) at the other sweeps'
  // 8 chunks per thread.
  const int64_t C = g.c, rows = g.m(), nc = std::min<int64_t>(n_chunks(rows), at::get_num_threads());
  const bool tiles = walk_tiles(C, kTile, rows * C * int64_t(sizeof(T)));
  std::vector<double> shift(nc * C), S(nc * C, 0.0), Q(nc * C, 0.0);
  std::vector<int64_t> count(nc, 0);
  std::vector<std::vector<float>> bufs(at::get_num_threads(), std::vector<float>(3 * C));
  row_blocks(rows, nc, [&](int64_t ch, int64_t rb, int64_t nb) {
    float* mb = bufs[at::get_thread_num()].data();  // per channel: the block's mean, sum d, sum d^2
    const float* sd = mb + C;
    const float* m2 = sd + C;
    const T* p = x + rb * C;
    const std::integral_constant<int64_t, W> full;
    int64_t c0 = 0;
    for (const int64_t vecs = C / W; c0 < vecs * W;) {
      const int64_t nv = tiles ? std::min(kTile, vecs - c0 / W) : 1;
      if (tiles) tile_moments<kTile>(p + c0, C, nb, full, nv, mb + c0);
      else tile_moments<1>(p + c0, C, nb, full, 1, mb + c0);
      c0 += nv * W;
    }
    if (c0 < C) tile_moments<1>(p + c0, C, nb, C - c0, 1, mb + c0);
    double* k = shift.data() + ch * C;
    double* s1 = S.data() + ch * C;
    double* q = Q.data() + ch * C;
    if (count[ch] == 0)
      for (int64_t c = 0; c < C; ++c) k[c] = mb[c] + double(sd[c]) / nb;
    for (int64_t c = 0; c < C; ++c) {
      const double sdc = sd[c], d = mb[c] + sdc / nb - k[c];
      s1[c] += nb * d;
      q[c] += std::max(0.0, m2[c] - sdc * sdc / nb) + nb * d * d;
    }
    count[ch] += nb;
  });
  for (int64_t c = 0; c < C; ++c) {
    Moments t;
    for (int64_t ch = 0; ch < nc; ++ch) {
      const double n = count[ch], s1 = S[ch * C + c];
      if (n > 0) t.merge(n, shift[ch * C + c] + s1 / n, std::max(0.0, Q[ch * C + c] - s1 * s1 / n));
    }
    mean[c] = t.mean;
    var[c] = t.m2 / t.n;
  }
}

template <typename T>
void stats_nchw(const T* x, const Geo& g, double* mean, double* var) {
  // Per run of a plane: block_sums with one mean for all lanes, summed across lanes; runs merge
  // with Chan's formula.
  const int64_t C = g.c, HW = g.hw;
  at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      Moments t;
      for (int64_t n = 0; n < g.n; ++n) {
        const T* p = x + (n * C + c) * HW;
        for (int64_t i0 = 0; i0 < HW; i0 += kRun) {
          const int64_t len = std::min(kRun, HW - i0), nv = (len + W - 1) / W, tail = len - (nv - 1) * W;
          const BlockSums bs = block_sums(
              nv, static_cast<float>(len),
              [&](int64_t i) BNFF_LAMBDA { return ld(p + i0 + i * W, i == nv - 1 ? tail : W); },
              [&](int64_t i, V d) BNFF_LAMBDA { return i == nv - 1 && tail < W ? V::set(V(0.f), d, tail) : d; });
          const double sdc = lane_sum(bs.sd), mean_b = lanes(bs.mb)[0] + sdc / len;
          t.merge(len, mean_b, std::max(0.0, lane_sum(bs.m2) - sdc * sdc / len));
        }
      }
      mean[c] = t.mean;
      var[c] = t.m2 / t.n;
    }
  });
}

std::tuple<Tensor, Tensor> channel_stats(const Tensor& x, int64_t layout) {
  Geo g = geo_of(x, layout);
  count(kChannelStats, g.cl, x);
  std::vector<double> md(g.c), vd(g.c);
  BNFF_DISPATCH(x.scalar_type(), "bnff::channel_stats", [&] {
    if (g.cl) stats_cl(x.data_ptr<scalar_t>(), g, md.data(), vd.data());
    else stats_nchw(x.data_ptr<scalar_t>(), g, md.data(), vd.data());
  });
  Tensor mean = at::empty({g.c}, x.options().dtype(at::kFloat)), var = at::empty_like(mean);
  for (int64_t c = 0; c < g.c; ++c) {
    mean.data_ptr<float>()[c] = static_cast<float>(md[c]);
    var.data_ptr<float>()[c] = static_cast<float>(vd[c]);
  }
  return {mean, var};
}


template <typename TX, typename TO>
void apply_kernel(const std::vector<std::vector<Src>>& terms, const std::vector<TermVec>& vec,
                  const std::vector<Src>& residuals, int64_t act_arg, const Geo& g, TO* out) {
  const int64_t act = act_for<TX>(act_arg);
  const int64_t C = g.c, K = terms.size(), R = residuals.size();
  TORCH_CHECK(K <= kMaxTerms && R <= kMaxTerms, "bnff cpu apply: at most ", kMaxTerms, " BN terms and shortcuts");
  const TX* rp[kMaxTerms];
  for (int64_t j = 0; j < R; ++j) rp[j] = residuals[j].at<TX>();
  if (!g.cl) {  // runtime activation and counts: NCHW is the uncommon layout, kept out of the instantiations
    const int64_t HW = g.hw;
    planes(g, C, [&](int64_t n, int64_t c) {
      const TX* xp[kMaxTerms];
      term_planes(terms, n, c, HW, xp);
      const int64_t base = (n * C + c) * HW;
      vectors(0, HW, [&](int64_t i, auto w) BNFF_LAMBDA {
        const V z = applied(
            K, R, vec.data(), [&](int64_t k) BNFF_LAMBDA { return ld(xp[k] + i, w); },
            [&](int64_t j) BNFF_LAMBDA { return ld(rp[j] + base + i, w); }, [&](const float* p) BNFF_LAMBDA { return per_plane(p, c); }, act);
        st(out + base + i, z, w);
      });
    });
    return;
  }
  const auto sp = seg_ptrs<TX>(segments(C, terms), terms);
  with_act<true, TX>(act, [&](auto A) {
    with_terms_for(A, K, R, [&](auto KK, auto RR) {
      row_blocks(g.m(), n_chunks(g.m()), [&](int64_t, int64_t rb, int64_t nb) {
        std::vector<float> buf(runtime_act<decltype(A)> ? C : 0);
        for (int64_t r = rb; r < rb + nb; ++r) apply_row(KK, RR, A, sp, vec.data(), rp, C, r, out + r * C, buf.data());
      });
    });
  });
}

Tensor apply(at::TensorList sources, at::IntArrayRef n_sources, at::TensorList means, at::TensorList f1s,
             at::TensorList betas, at::TensorList residuals, int64_t act, at::ScalarType out_dtype, int64_t layout) {
  TORCH_CHECK(!sources.empty() || !residuals.empty(), "bnff cpu apply: nothing to apply");
  const Tensor& like = residuals.empty() ? sources[0] : residuals[0];
  Geo g0 = geo_of(like, layout);
  const Tensor& feature = sources.empty() ? like : sources[0];
  count(kApply, g0.cl, feature);
  int64_t C = 0;
  for (int64_t j = 0; j < (n_sources.empty() ? 0 : n_sources[0]); ++j) C += sources[j].size(1);
  if (sources.empty()) C = like.size(1);
  Geo g{g0.cl, g0.n, C, g0.hw};
  Tensor out = workspace_empty({g.n, C, like.size(2), like.size(3)}, like.options().dtype(out_dtype), g.cl);
  auto terms = terms_of(sources, n_sources);
  auto vec = vecs_of(means, f1s, betas);
  std::vector<Src> res;
  for (const Tensor& r : residuals) res.push_back(Src{r.data_ptr(), C, 0});
  BNFF_DISPATCH(feature.scalar_type(), "bnff::apply", [&] {
    using TX = scalar_t;
    BNFF_DISPATCH(out_dtype, "bnff::apply", [&] { apply_kernel<TX>(terms, vec, res, act, g, out.data_ptr<scalar_t>()); });
  });
  return out;
}

// ---- per-channel vectors of one BN term ---------------------------------------------------------
// bnff.ops.bn_math's formulas on (C,) float32 vectors, one call for what takes it up to nine small ATen
// ops (each a dispatch and an allocation, per BN per step). Each value is computed with the
// operations of bn_math in the same order, each rounded to float as ATen's float32 element-wise ops
// round them (a Python float or int operand is first cast to float; rsqrt is 1 / sqrt, correctly
// rounded; no contraction), so they equal the reference backend's bit for bit.
float* vec_ptr(const Tensor& v, int64_t c, const char* what) {
  TORCH_CHECK(v.scalar_type() == at::kFloat && v.dim() == 1 && v.size(0) == c && v.is_contiguous(),
              "bnff cpu vectors: ", what, " must be a contiguous float32 (", c, ",) vector");
  return v.data_ptr<float>();
}

BNFF_INLINE float inv_std(float var, float eps) { return 1.0f / std::sqrt(var + eps); }

// F1 = gamma / sqrt(var + eps) (seed 002 eq. 10), gamma = 1 without one (bn_math.scale).
Tensor scale(const Tensor& var, const std::optional<Tensor>& gamma, double eps) {
  const int64_t C = var.numel();
  const float* v = vec_ptr(var, C, "var");
  Tensor g32 = gamma ? gamma->to(at::kFloat).contiguous() : Tensor();
  const float* g = gamma ? vec_ptr(g32, C, "gamma") : nullptr;
  Tensor f1 = at::empty({C}, var.options());
  float* f = f1.data_ptr<float>();
  const float e = static_cast<float>(eps);
  for (int64_t c = 0; c < C; ++c) f[c] = g ? g[c] * inv_std(v[c], e) : inv_std(v[c], e);
  return f1;
}

// B = -F1 S2c' / (var + eps) (eq. 13, 15; bn_math.backward_coefficient) from the S2c' that dx uses
// (all processes' for a SyncBatchNorm), only when the BN uses mini-batch statistics (`batch`);
// dgamma = m S2c / sqrt(var + eps), dbeta = m S1 (bn_math.affine_grads) from this process's sums.
std::tuple<std::optional<Tensor>, Tensor, Tensor> backward_vectors(const Tensor& var, const Tensor& f1, const Tensor& s1,
                                                                    const Tensor& s2c, const Tensor& s2c_dx, int64_t m,
                                                                    double eps, bool batch) {
  const int64_t C = var.numel();
  const float *v = vec_ptr(var, C, "var"), *f = vec_ptr(f1, C, "f1"), *a = vec_ptr(s1, C, "s1"),
              *q = vec_ptr(s2c, C, "s2c"), *qd = vec_ptr(s2c_dx, C, "s2c_dx");
  const float e = static_cast<float>(eps), mf = static_cast<float>(m);
  Tensor dgamma = at::empty({C}, var.options()), dbeta = at::empty({C}, var.options());
  float *dg = dgamma.data_ptr<float>(), *db = dbeta.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    dg[c] = (q[c] * mf) * inv_std(v[c], e);
    db[c] = a[c] * mf;
  }
  std::optional<Tensor> b;
  if (batch) {
    b = at::empty({C}, var.options());
    float* bp = b->data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) bp[c] = (-f[c] * qd[c]) / (v[c] + e);
  }
  return {b, dgamma, dbeta};
}

// running_mean = (1 - f) running_mean + f mean, running_var = (1 - f) running_var + f var m / (m - 1) in
// place (bn_math.blend_running_stats: PyTorch's update, with the factor f that bn_math.running_factor
// chose). The same formula as the reference's ATen ops; their last bit may differ (ATen may fuse the
// multiply-add), which the running statistics' accuracy rule allows.
void running_update(Tensor rm, Tensor rv, const Tensor& mean, const Tensor& var, double factor, int64_t m) {
  const int64_t C = rm.numel();
  float *r = vec_ptr(rm, C, "running_mean"), *q = vec_ptr(rv, C, "running_var");
  const float *mu = vec_ptr(mean, C, "mean"), *v = vec_ptr(var, C, "var");
  const float keep = static_cast<float>(1.0 - factor), f = static_cast<float>(factor),
              unbiased = static_cast<float>(static_cast<double>(m) / static_cast<double>(m - 1));
  for (int64_t c = 0; c < C; ++c) {
    r[c] = r[c] * keep + f * mu[c];
    q[c] = q[c] * keep + f * (v[c] * unbiased);
  }
}

int64_t workspace_release() { return Workspace::get().release(); }
int64_t workspace_held() { return Workspace::get().held(); }

}  // namespace bnff_cpu

using namespace bnff_cpu;


TORCH_LIBRARY(bnff, m) {
  m.def("channel_stats(Tensor x, int layout) -> (Tensor, Tensor)");
  m.def("workspace_release() -> int", &workspace_release);
  m.def("workspace_held() -> int", &workspace_held);
  m.def("kernel_calls() -> (str[], int[])", &kernel_calls);
  m.def("pointwise_target(str target) -> str", &pointwise_target);
  m.def("pointwise_has(ScalarType dtype) -> bool", &pointwise_has);
  m.def("scale(Tensor var, Tensor? gamma, float eps) -> Tensor");
  m.def("backward_vectors(Tensor var, Tensor f1, Tensor s1, Tensor s2c, Tensor s2c_dx, int m, float eps, bool batch) "
        "-> (Tensor?, Tensor, Tensor)");
  m.def("running_update(Tensor(a!) rm, Tensor(b!) rv, Tensor mean, Tensor var, float factor, int m) -> ()");
  m.def("apply(Tensor[] sources, int[] n_sources, Tensor[] means, Tensor[] f1s, Tensor[] betas, "
        "Tensor[] residuals, int act, ScalarType out_dtype, int layout) -> Tensor");
  m.def("grad_stats(Tensor grad, Tensor? a, int act, Tensor[] sources, int[] n_sources, Tensor[] means, "
        "Tensor[] f1s, Tensor[] betas, Tensor[] residuals, int layout) -> (Tensor, Tensor[], Tensor[])");
  m.def("input_grad(Tensor dy, Tensor[] sources, Tensor mean, Tensor f1, Tensor? b, Tensor s1, int layout) "
        "-> Tensor[]");
  m.def("grad_stats_x(Tensor grad, Tensor[] sources, Tensor mean, Tensor f1, Tensor beta, int act, "
        "ScalarType out_dtype, int layout) -> (Tensor, Tensor)");
  m.def("input_grad_x(Tensor grad, Tensor[] sources, Tensor mean, Tensor f1, Tensor beta, int act, "
        "ScalarType out_dtype, Tensor? b, Tensor s1, int layout) -> Tensor[]");
  m.def("pointwise_forward(Tensor[] sources, int[] n_sources, Tensor[] means, Tensor[] f1s, Tensor[] betas, "
        "Tensor[] residuals, int act, Tensor weight, int stride, bool stats, int block_rows, int layout) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("pointwise_backward(Tensor[] sources, Tensor? mean, Tensor? f1, Tensor? beta, int act, Tensor dy, Tensor weight, "
        "bool wgrad, int block_rows, int layout) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnff, CPU, m) {
  m.impl("channel_stats", &channel_stats);
  m.impl("apply", &apply);
  m.impl("scale", &scale);
  m.impl("backward_vectors", &backward_vectors);
  m.impl("running_update", &running_update);
  m.impl("grad_stats", &grad_stats);
  m.impl("input_grad", &input_grad);
  m.impl("grad_stats_x", &grad_stats_x);
  m.impl("input_grad_x", &input_grad_x);
  m.impl("pointwise_forward", &pointwise_forward);
  m.impl("pointwise_backward", &pointwise_backward);
}
