// bnff's fused CPU sweeps (the "cpu" backend): each function is one pass over its feature maps.
//
// The same four sweeps as bnff/ops/backends/reference.py, same arguments, same math (seed 002
// eq. 1, 9, 12, 16-20, in centered form), registered as torch.library ops "bnff::*":
//   channel_stats  step 1 forward: per-channel mean and biased variance, one read (MVF)
//   apply          step 2 forward: a = act(sum_k F1_k (x_k - mu_k) + beta_k + sum_j r_j), one read
//                  of every input, one write of a
//   grad_stats     step 1 backward: dy = g * act'(a), S1 = sum dy / m, S2c = sum dy (x - mu) / m
//   input_grad     step 2 backward: dx = F1 dy + B (x - mu) - F1 S1, written onto each source map
//   grad_stats_x, input_grad_x  the same two for a lone BN term without shortcut, dy never written:
//                  each sweep recomputes the activation mask from x, which it reads anyway
// A BN input may be several source maps (DenseNet ICF): they are read in place, never concatenated.
// Layouts: every tensor of a call either channels_last (rows of C channels) or contiguous NCHW
// (planes of H*W); the Python side checks and falls back to the reference otherwise.
// Element types: float32 or bfloat16, accumulated in float32 within blocks of rows and in double
// across blocks (Chan-style merge; statistics on data shifted by one sample per channel).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

namespace {

using at::Tensor;

// ---- element access: float32 and bfloat16 as float ------------------------------------------
typedef uint32_t __attribute__((may_alias)) u32a;
typedef uint16_t __attribute__((may_alias)) u16a;

// float -> bfloat16 bits, rounded to nearest even; NaN stays (a quiet) NaN.
inline uint16_t bf16_bits(uint32_t u) {
  return ((u & 0x7FFFFFFFu) > 0x7F800000u) ? uint16_t(0x7FC0) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// n elements from p + i as float: the data itself for float32, else converted into buf.
inline const float* row(const float* p, int64_t i, int64_t, float*) { return p + i; }
inline const float* row(const at::BFloat16* p, int64_t i, int64_t n, float* buf) {
  const u16a* __restrict s = reinterpret_cast<const u16a*>(p) + i;
  u32a* __restrict d = reinterpret_cast<u32a*>(buf);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) d[k] = static_cast<uint32_t>(s[k]) << 16;
  return buf;
}
// store n floats at p + i.
inline void put(float* p, int64_t i, int64_t n, const float* z) { std::memcpy(p + i, z, n * sizeof(float)); }
inline void put(at::BFloat16* p, int64_t i, int64_t n, const float* z) {
  const u32a* __restrict s = reinterpret_cast<const u32a*>(z);
  u16a* __restrict d = reinterpret_cast<u16a*>(p) + i;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) d[k] = bf16_bits(s[k]);
}

enum Act : int64_t { kNone = 0, kRelu = 1, kRelu6 = 2 };

// A (N, C, H, W) tensor as rows x channels (channels_last) or planes (NCHW).
struct Geo {
  bool cl;        // channels_last
  int64_t n, c, hw;
  int64_t m() const { return n * hw; }  // values per channel
};

Geo geo_of(const Tensor& t) {
  TORCH_CHECK(t.dim() == 4, "bnff cpu backend: expected a 4-D tensor, got ", t.dim(), "-D");
  bool cl = t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
  if (!cl) TORCH_CHECK(t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast),
                       "bnff cpu backend: tensor is neither contiguous nor channels_last");
  // a tensor with C == 1 or H*W == 1 is both; then the two layouts coincide for our indexing only if
  // we pick consistently: treat "both" as channels_last when its strides say so.
  if (t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) cl = t.stride(1) == 1;
  return Geo{cl, t.size(0), t.size(1), t.size(2) * t.size(3)};
}

// Call f with the typed data pointer of t (float32 or bfloat16).
template <typename F>
void typed(const Tensor& t, F&& f) {
  if (t.scalar_type() == at::kFloat) {
    f(t.data_ptr<float>());
  } else {
    TORCH_CHECK(t.scalar_type() == at::kBFloat16, "bnff cpu backend: float32 or bfloat16 expected, got ",
                t.scalar_type());
    f(reinterpret_cast<const at::BFloat16*>(t.data_ptr<at::BFloat16>()));
  }
}

// A source map of a term: its data, its channel count and its offset in the term's channels.
struct Src {
  const void* p;
  bool bf16;
  int64_t c, off;
};

inline const float* row(const Src& s, int64_t i, int64_t n, float* buf) {
  return s.bf16 ? row(static_cast<const at::BFloat16*>(s.p), i, n, buf) : row(static_cast<const float*>(s.p), i, n, buf);
}

std::vector<std::vector<Src>> terms_of(at::TensorList sources, at::IntArrayRef n_sources) {
  std::vector<std::vector<Src>> terms;
  size_t i = 0;
  for (int64_t k : n_sources) {
    std::vector<Src> t;
    int64_t off = 0;
    for (int64_t j = 0; j < k; ++j, ++i) {
      const Tensor& s = sources[i];
      t.push_back(Src{s.data_ptr(), s.scalar_type() == at::kBFloat16, s.size(1), off});
      off += s.size(1);
    }
    terms.push_back(std::move(t));
  }
  return terms;
}

int64_t n_chunks(int64_t rows) {
  int64_t want = std::max<int64_t>(1, rows / 64);
  return std::min<int64_t>(want, 8 * at::get_num_threads());
}

// ---- activation over a row, and its mask ---------------------------------------------------------
inline void activate_row(float* z, int64_t n, int64_t act) {
  if (act == kRelu) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) z[i] = z[i] > 0.f ? z[i] : 0.f;
  } else if (act == kRelu6) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) z[i] = z[i] < 0.f ? 0.f : (z[i] > 6.f ? 6.f : z[i]);
  }
}
// d = g * act'(z), the mask taken from the activation's output a (a > 0 iff z > 0, 0 < a < 6 iff 0 < z < 6).
inline void masked_row(const float* g, const float* a, float* d, int64_t n, int64_t act) {
  if (act == kRelu) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) d[i] = a[i] > 0.f ? g[i] : 0.f;
  } else if (act == kRelu6) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) d[i] = (a[i] > 0.f && a[i] < 6.f) ? g[i] : 0.f;
  } else {
    std::memcpy(d, g, n * sizeof(float));
  }
}

// ---- channel_stats ------------------------------------------------------------------------------
// Welford/Chan: each block of rows (in cache) gives its mean and M2 = sum (x - mean_b)^2 by two
// passes; blocks merge in double with Chan's formula. As accurate as ATen's
// var_mean; the raw one-sweep sum x^2 / m - mu^2, even on shifted data, is ~10x worse.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void merge(double nb, double mb, double m2b) {
    if (nb == 0) return;
    const double tot = n + nb, delta = mb - mean;
    mean += delta * nb / tot;
    m2 += m2b + delta * delta * n * nb / tot;
    n = tot;
  }
};

constexpr int64_t kBlock = 32;  // rows per block (channels_last)

template <typename T>
void stats_cl(const T* x, const Geo& g, double* mean, double* var) {
  // Per block of rows (in L1/L2): its float32 mean (full-width float loop), then the sum of
  // d = x - mean_b and of d^2 in double (centered values: nothing cancels); blocks merge in double.
  const int64_t C = g.c, rows = g.m(), nc = n_chunks(rows);
  std::vector<Moments> part(nc * C);
  at::parallel_for(0, nc, 1, [&](int64_t b, int64_t e) {
    std::vector<float> blk(kBlock * C), sum(C), mb(C);
    std::vector<double> sd(C), m2(C);
    for (int64_t ch = b; ch < e; ++ch) {
      const int64_t r0 = ch * rows / nc, r1 = (ch + 1) * rows / nc;
      for (int64_t rb = r0; rb < r1; rb += kBlock) {
        const int64_t nb = std::min(r1, rb + kBlock) - rb;
        std::fill(sum.begin(), sum.end(), 0.f);
        std::fill(sd.begin(), sd.end(), 0.0);
        std::fill(m2.begin(), m2.end(), 0.0);
        const float* xr[kBlock];
        for (int64_t i = 0; i < nb; ++i) {
          xr[i] = row(x, (rb + i) * C, C, blk.data() + i * C);
          const float* p = xr[i];
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) sum[c] += p[c];
        }
        const float inv = 1.f / nb;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) mb[c] = sum[c] * inv;
        for (int64_t i = 0; i < nb; ++i) {  // d = x - mb; sum d corrects mb's rounding
          const float* p = xr[i];
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const double d = p[c] - mb[c];
            sd[c] += d;
            m2[c] += d * d;
          }
        }
        for (int64_t c = 0; c < C; ++c)
          part[ch * C + c].merge(nb, mb[c] + sd[c] / nb, std::max(0.0, m2[c] - sd[c] * sd[c] / nb));
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    Moments t;
    for (int64_t ch = 0; ch < nc; ++ch) t.merge(part[ch * C + c].n, part[ch * C + c].mean, part[ch * C + c].m2);
    mean[c] = t.mean;
    var[c] = t.m2 / t.n;
  }
}

template <typename T>
void stats_nchw(const T* x, const Geo& g, double* mean, double* var) {
  const int64_t C = g.c, HW = g.hw;
  at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
    std::vector<float> buf(std::min<int64_t>(HW, 512));
    for (int64_t c = b; c < e; ++c) {
      Moments t;
      for (int64_t n = 0; n < g.n; ++n) {
        for (int64_t i0 = 0; i0 < HW; i0 += 512) {
          const int64_t len = std::min<int64_t>(HW - i0, 512);
          const float* xr = row(x, (n * C + c) * HW + i0, len, buf.data());
          double s = 0.0;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < len; ++i) s += xr[i];
          const double mb = s / len;
          double m2 = 0.0;
#pragma omp simd reduction(+ : m2)
          for (int64_t i = 0; i < len; ++i) m2 += (xr[i] - mb) * (xr[i] - mb);
          t.merge(len, mb, m2);
        }
      }
      mean[c] = t.mean;
      var[c] = t.m2 / t.n;
    }
  });
}

std::tuple<Tensor, Tensor> channel_stats(const Tensor& x) {
  Geo g = geo_of(x);
  auto opts = x.options().dtype(at::kDouble);
  Tensor mean = at::empty({g.c}, opts), var = at::empty({g.c}, opts);
  typed(x, [&](auto* p) {
    if (g.cl) stats_cl(p, g, mean.data_ptr<double>(), var.data_ptr<double>());
    else stats_nchw(p, g, mean.data_ptr<double>(), var.data_ptr<double>());
  });
  return {mean.to(at::kFloat), var.to(at::kFloat)};
}

// ---- apply --------------------------------------------------------------------------------------
// Per-term (C,) float vectors: mean, F1, beta (zeros without affine).
struct TermVec {
  const float *mu, *f1, *beta;
};

std::vector<TermVec> vecs_of(at::TensorList means, at::TensorList f1s, at::TensorList betas) {
  std::vector<TermVec> v;
  for (size_t k = 0; k < means.size(); ++k)
    v.push_back(TermVec{means[k].data_ptr<float>(), f1s[k].data_ptr<float>(), betas[k].data_ptr<float>()});
  return v;
}

// z += F1 (x - mu) + beta over n channels (vectors already offset to the first channel).
inline void affine_add(float* __restrict z, const float* __restrict x, const float* mu, const float* f1,
                       const float* beta, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) z[c] += (x[c] - mu[c]) * f1[c] + beta[c];
}

template <typename TO>
void apply_kernel(const std::vector<std::vector<Src>>& terms, const std::vector<TermVec>& vec,
                  const std::vector<Src>& residuals, int64_t act, const Geo& g, TO* out) {
  const int64_t C = g.c;
  if (g.cl) {
    at::parallel_for(0, g.m(), 16, [&](int64_t b, int64_t e) {
      std::vector<float> z(C), buf(C);
      for (int64_t r = b; r < e; ++r) {
        std::fill(z.begin(), z.end(), 0.f);
        for (size_t k = 0; k < terms.size(); ++k) {
          const TermVec& v = vec[k];
          for (const Src& s : terms[k]) {
            const float* xr = row(s, r * s.c, s.c, buf.data());
            affine_add(z.data() + s.off, xr, v.mu + s.off, v.f1 + s.off, v.beta + s.off, s.c);
          }
        }
        for (const Src& s : residuals) {
          const float* rr = row(s, r * C, C, buf.data());
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) z[c] += rr[c];
        }
        activate_row(z.data(), C, act);
        put(out, r * C, C, z.data());
      }
    });
  } else {
    const int64_t HW = g.hw;
    at::parallel_for(0, g.n * C, 1, [&](int64_t b, int64_t e) {
      std::vector<float> z(HW), buf(HW);
      for (int64_t pl = b; pl < e; ++pl) {
        const int64_t n = pl / C, c = pl % C;
        std::fill(z.begin(), z.end(), 0.f);
        for (size_t k = 0; k < terms.size(); ++k) {
          const TermVec& v = vec[k];
          for (const Src& s : terms[k]) {
            if (c < s.off || c >= s.off + s.c) continue;
            const float* xr = row(s, (n * s.c + (c - s.off)) * HW, HW, buf.data());
            const float mu = v.mu[c], f1 = v.f1[c], beta = v.beta[c];
#pragma omp simd
            for (int64_t i = 0; i < HW; ++i) z[i] += (xr[i] - mu) * f1 + beta;
          }
        }
        for (const Src& s : residuals) {
          const float* rr = row(s, (n * C + c) * HW, HW, buf.data());
#pragma omp simd
          for (int64_t i = 0; i < HW; ++i) z[i] += rr[i];
        }
        activate_row(z.data(), HW, act);
        put(out, (n * C + c) * HW, HW, z.data());
      }
    });
  }
}

Tensor apply(at::TensorList sources, at::IntArrayRef n_sources, at::TensorList means, at::TensorList f1s,
             at::TensorList betas, at::TensorList residuals, int64_t act, at::ScalarType out_dtype) {
  TORCH_CHECK(!sources.empty() || !residuals.empty(), "bnff cpu apply: nothing to apply");
  const Tensor& like = residuals.empty() ? sources[0] : residuals[0];
  Geo g0 = geo_of(like);
  int64_t C = 0;
  for (int64_t j = 0; j < (n_sources.empty() ? 0 : n_sources[0]); ++j) C += sources[j].size(1);
  if (sources.empty()) C = like.size(1);
  Geo g{g0.cl, g0.n, C, g0.hw};
  auto fmt = g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  Tensor out = at::empty({g.n, C, like.size(2), like.size(3)}, like.options().dtype(out_dtype), fmt);
  auto terms = terms_of(sources, n_sources);
  auto vec = vecs_of(means, f1s, betas);
  std::vector<Src> res;
  for (const Tensor& r : residuals) res.push_back(Src{r.data_ptr(), r.scalar_type() == at::kBFloat16, C, 0});
  typed(out, [&](auto* p) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(p)>>;
    apply_kernel(terms, vec, res, act, g, const_cast<T*>(p));
  });
  return out;
}

// ---- grad_stats ---------------------------------------------------------------------------------
// dy = g * act'(a) (written in g's dtype: exact); per term S1 = sum dy / m, S2c = sum dy (x - mu) / m.
template <typename TG>
void grad_stats_kernel(const TG* gp, const Src* a, int64_t act, const std::vector<std::vector<Src>>& terms,
                       const std::vector<const float*>& mus, const Geo& g, TG* dy, std::vector<double>& s1,
                       std::vector<double>& s2) {
  const int64_t C = g.c, K = terms.size();
  s1.assign(C, 0.0);  // dy's channel sums are the same for every term
  s2.assign(K * C, 0.0);
  if (g.cl) {
    const int64_t rows = g.m(), nc = n_chunks(rows);
    std::vector<double> p1(nc * C, 0.0), p2(nc * K * C, 0.0);
    at::parallel_for(0, nc, 1, [&](int64_t b, int64_t e) {
      std::vector<float> d(C), a1(C), a2(K * C), gb(C), ab(C), xb(C);
      for (int64_t ch = b; ch < e; ++ch) {
        const int64_t r0 = ch * rows / nc, r1 = (ch + 1) * rows / nc;
        for (int64_t rb = r0; rb < r1; rb += 32) {
          std::fill(a1.begin(), a1.end(), 0.f);
          std::fill(a2.begin(), a2.end(), 0.f);
          for (int64_t r = rb; r < std::min(r1, rb + 32); ++r) {
            const int64_t base = r * C;
            const float* gr = row(gp, base, C, gb.data());
            masked_row(gr, a ? row(*a, base, C, ab.data()) : gr, d.data(), C, a ? act : kNone);
            put(dy, base, C, d.data());
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) a1[c] += d[c];
            for (int64_t k = 0; k < K; ++k) {
              for (const Src& s : terms[k]) {
                const float* xr = row(s, r * s.c, s.c, xb.data());
                const float* mu = mus[k] + s.off;
                const float* dd = d.data() + s.off;
                float* acc = a2.data() + k * C + s.off;
#pragma omp simd
                for (int64_t c = 0; c < s.c; ++c) acc[c] += dd[c] * (xr[c] - mu[c]);
              }
            }
          }
          for (int64_t c = 0; c < C; ++c) p1[ch * C + c] += a1[c];
          for (int64_t i = 0; i < K * C; ++i) p2[ch * K * C + i] += a2[i];
        }
      }
    });
    for (int64_t ch = 0; ch < nc; ++ch) {
      for (int64_t c = 0; c < C; ++c) s1[c] += p1[ch * C + c];
      for (int64_t i = 0; i < K * C; ++i) s2[i] += p2[ch * K * C + i];
    }
  } else {
    const int64_t HW = g.hw;
    at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
      std::vector<float> d(HW), gb(HW), ab(HW), xb(HW);
      for (int64_t c = b; c < e; ++c) {
        double t1 = 0;
        std::vector<double> t2(K, 0.0);
        for (int64_t n = 0; n < g.n; ++n) {
          const int64_t base = (n * C + c) * HW;
          const float* gr = row(gp, base, HW, gb.data());
          masked_row(gr, a ? row(*a, base, HW, ab.data()) : gr, d.data(), HW, a ? act : kNone);
          put(dy, base, HW, d.data());
          float a1 = 0.f;
#pragma omp simd reduction(+ : a1)
          for (int64_t i = 0; i < HW; ++i) a1 += d[i];
          t1 += a1;
          for (int64_t k = 0; k < K; ++k) {
            for (const Src& s : terms[k]) {
              if (c < s.off || c >= s.off + s.c) continue;
              const float* xr = row(s, (n * s.c + (c - s.off)) * HW, HW, xb.data());
              const float mu = mus[k][c];
              float a2 = 0.f;
#pragma omp simd reduction(+ : a2)
              for (int64_t i = 0; i < HW; ++i) a2 += d[i] * (xr[i] - mu);
              t2[k] += a2;
            }
          }
        }
        s1[c] = t1;
        for (int64_t k = 0; k < K; ++k) s2[k * C + c] = t2[k];
      }
    });
  }
}

// C per-channel sums divided by m, as a float (C,) tensor.
Tensor per_channel(const double* sums, const Geo& g, const Tensor& like) {
  Tensor t = at::empty({g.c}, like.options().dtype(at::kFloat));
  for (int64_t c = 0; c < g.c; ++c) t.data_ptr<float>()[c] = static_cast<float>(sums[c] / g.m());
  return t;
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> grad_stats(
    const Tensor& grad, const std::optional<Tensor>& a, int64_t act, at::TensorList sources,
    at::IntArrayRef n_sources, at::TensorList means) {
  Geo g = geo_of(grad);
  auto fmt = g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  Tensor dy = at::empty(grad.sizes(), grad.options(), fmt);
  auto terms = terms_of(sources, n_sources);
  std::vector<const float*> mus;
  for (const Tensor& m : means) mus.push_back(m.data_ptr<float>());
  std::optional<Src> as;
  if (act != kNone) {
    TORCH_CHECK(a.has_value(), "bnff cpu grad_stats: the activation output is needed for its mask");
    as = Src{a->data_ptr(), a->scalar_type() == at::kBFloat16, g.c, 0};
  }
  std::vector<double> s1, s2;
  typed(grad, [&](auto* p) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(p)>>;
    grad_stats_kernel(p, as ? &*as : nullptr, act, terms, mus, g, dy.data_ptr<T>(), s1, s2);
  });
  std::vector<Tensor> s1s, s2s;
  for (size_t k = 0; k < terms.size(); ++k) {
    s1s.push_back(per_channel(s1.data(), g, grad));
    s2s.push_back(per_channel(s2.data() + k * g.c, g, grad));
  }
  return {dy, s1s, s2s};
}

// ---- input_grad ---------------------------------------------------------------------------------
// dx_j = F1 dy + B (x_j - mu) - F1 S1 on source j's channels [off, off + C_j) (vectors offset there).
inline void dx_row(const float* dy, const float* x, float* z, const float* f1, const float* b, const float* mu,
                   const float* k0, int64_t n) {
  if (b != nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) z[c] = f1[c] * dy[c] + b[c] * (x[c] - mu[c]) - k0[c];
  } else {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) z[c] = f1[c] * dy[c];
  }
}

template <typename TD, typename TX>
void input_grad_kernel(const TD* dy, const TX* x, TX* dx, const Geo& g, int64_t C_total, int64_t off,
                       int64_t Cj, const float* f1, const float* b, const float* mu, const float* k0) {
  if (g.cl) {
    at::parallel_for(0, g.m(), 16, [&](int64_t bb, int64_t e) {
      std::vector<float> db(Cj), xb(Cj), z(Cj);
      for (int64_t r = bb; r < e; ++r) {
        const float* dr = row(dy, r * C_total + off, Cj, db.data());
        const float* xr = b ? row(x, r * Cj, Cj, xb.data()) : nullptr;
        dx_row(dr, xr, z.data(), f1, b, mu, k0, Cj);
        put(dx, r * Cj, Cj, z.data());
      }
    });
  } else {
    const int64_t HW = g.hw;
    at::parallel_for(0, g.n * Cj, 1, [&](int64_t bb, int64_t e) {
      std::vector<float> db(HW), xb(HW), z(HW);
      for (int64_t pl = bb; pl < e; ++pl) {
        const int64_t n = pl / Cj, c = pl % Cj;
        const float* dr = row(dy, (n * C_total + off + c) * HW, HW, db.data());
        const float F = f1[c];
        if (b != nullptr) {
          const float* xr = row(x, (n * Cj + c) * HW, HW, xb.data());
          const float B = b[c], M = mu[c], K = k0[c];
#pragma omp simd
          for (int64_t i = 0; i < HW; ++i) z[i] = F * dr[i] + B * (xr[i] - M) - K;
        } else {
#pragma omp simd
          for (int64_t i = 0; i < HW; ++i) z[i] = F * dr[i];
        }
        put(dx, (n * Cj + c) * HW, HW, z.data());
      }
    });
  }
}

std::vector<Tensor> input_grad(const Tensor& dy, at::TensorList sources, const Tensor& mean, const Tensor& f1,
                               const std::optional<Tensor>& b, const Tensor& s1) {
  Geo g = geo_of(dy);
  Tensor k0 = (f1 * s1).contiguous();  // F1 * S1 per channel
  std::vector<Tensor> out;
  int64_t off = 0;
  for (const Tensor& x : sources) {
    const int64_t Cj = x.size(1);
    auto fmt = g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    Tensor dx = at::empty(x.sizes(), x.options(), fmt);
    const float* bp = b ? b->data_ptr<float>() + off : nullptr;
    typed(dy, [&](auto* dp) {
      typed(x, [&](auto* xp) {
        using TX = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
        input_grad_kernel(dp, xp, dx.data_ptr<TX>(), g, g.c, off, Cj, f1.data_ptr<float>() + off, bp,
                          mean.data_ptr<float>() + off, k0.data_ptr<float>() + off);
      });
    });
    out.push_back(dx);
    off += Cj;
  }
  return out;
}

// ---- the backward of a lone BN feeding consumers, without dy ----------------------------------------
// For a group of one BN term and no shortcut (patterns (2), (3), DenseNet's ICF), dy = g * act'(a)
// need not be written: both backward sweeps recompute the mask from x (which they read anyway for
// S2 and for dx) instead of reading a and a written dy. Mode kStats reduces S1, S2c; mode kDx writes
// dx = F1 dy + B (x - mu) - F1 S1 onto each source map.
// Round a float row to the stored element type's precision (the mask must be the stored value's:
// 5.99f stored as bfloat16 is 6, outside ReLU6's open interval).
inline void round_bf16_row(float* z, int64_t n) {
  u32a* __restrict u = reinterpret_cast<u32a*>(z);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) u[i] = static_cast<uint32_t>(bf16_bits(u[i])) << 16;
}

enum Mode { kStats = 0, kDx = 1 };

struct TermBwd {  // one BN term's per-channel vectors (C,), offset by each source's .off
  const float *mu, *f1, *beta, *b, *k0;
  int64_t act;
  bool round_bf16;
};

template <typename TG>
void term_backward_cl(const TG* gp, const std::vector<Src>& srcs, const std::vector<void*>& dxs, const TermBwd& t,
                      const Geo& g, Mode mode, std::vector<double>& s1, std::vector<double>& s2) {
  const int64_t C = g.c, rows = g.m();
  const int64_t nc = mode == kStats ? n_chunks(rows) : std::min<int64_t>(rows, 8 * at::get_num_threads());
  std::vector<double> p1(mode == kStats ? nc * C : 0, 0.0), p2(mode == kStats ? nc * C : 0, 0.0);
  at::parallel_for(0, nc, 1, [&](int64_t b, int64_t e) {
    std::vector<float> z(C), d(C), gb(C), xbuf(C), a1(C), a2(C), out(C);
    std::vector<const float*> xs(srcs.size());
    for (int64_t ch = b; ch < e; ++ch) {
      const int64_t r0 = ch * rows / nc, r1 = (ch + 1) * rows / nc;
      for (int64_t blk = r0; blk < r1; blk += 32) {
        std::fill(a1.begin(), a1.end(), 0.f);
        std::fill(a2.begin(), a2.end(), 0.f);
        for (int64_t r = blk; r < std::min(r1, blk + 32); ++r) {
          for (size_t j = 0; j < srcs.size(); ++j) {
            const Src& s = srcs[j];
            xs[j] = row(s, r * s.c, s.c, xbuf.data() + s.off);
            const float* xr = xs[j];
            float* zz = z.data() + s.off;
#pragma omp simd
            for (int64_t c = 0; c < s.c; ++c) zz[c] = (xr[c] - t.mu[s.off + c]) * t.f1[s.off + c] + t.beta[s.off + c];
          }
          activate_row(z.data(), C, t.act);
          if (t.round_bf16) round_bf16_row(z.data(), C);
          masked_row(row(gp, r * C, C, gb.data()), z.data(), d.data(), C, t.act);
          if (mode == kStats) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) a1[c] += d[c];
            for (size_t j = 0; j < srcs.size(); ++j) {
              const Src& s = srcs[j];
              const float* xr = xs[j];
#pragma omp simd
              for (int64_t c = 0; c < s.c; ++c) a2[s.off + c] += d[s.off + c] * (xr[c] - t.mu[s.off + c]);
            }
          } else {
            for (size_t j = 0; j < srcs.size(); ++j) {
              const Src& s = srcs[j];
              dx_row(d.data() + s.off, xs[j], out.data(), t.f1 + s.off, t.b ? t.b + s.off : nullptr, t.mu + s.off,
                     t.k0 + s.off, s.c);
              if (s.bf16) put(static_cast<at::BFloat16*>(dxs[j]), r * s.c, s.c, out.data());
              else put(static_cast<float*>(dxs[j]), r * s.c, s.c, out.data());
            }
          }
        }
        if (mode == kStats) {
          for (int64_t c = 0; c < C; ++c) {
            p1[ch * C + c] += a1[c];
            p2[ch * C + c] += a2[c];
          }
        }
      }
    }
  });
  if (mode == kStats) {
    s1.assign(C, 0.0);
    s2.assign(C, 0.0);
    for (int64_t ch = 0; ch < nc; ++ch)
      for (int64_t c = 0; c < C; ++c) {
        s1[c] += p1[ch * C + c];
        s2[c] += p2[ch * C + c];
      }
  }
}

template <typename TG>
void term_backward_nchw(const TG* gp, const std::vector<Src>& srcs, const std::vector<void*>& dxs,
                        const TermBwd& t, const Geo& g, Mode mode, std::vector<double>& s1, std::vector<double>& s2) {
  const int64_t C = g.c, HW = g.hw;
  s1.assign(C, 0.0);
  s2.assign(C, 0.0);
  at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
    std::vector<float> z(HW), d(HW), gb(HW), xb(HW), out(HW);
    for (int64_t c = b; c < e; ++c) {
      size_t j = 0;
      while (c >= srcs[j].off + srcs[j].c) ++j;
      const Src& s = srcs[j];
      const float mu = t.mu[c], f1 = t.f1[c], beta = t.beta[c];
      double t1 = 0, t2 = 0;
      for (int64_t n = 0; n < g.n; ++n) {
        const int64_t xo = (n * s.c + (c - s.off)) * HW;
        const float* xr = row(s, xo, HW, xb.data());
#pragma omp simd
        for (int64_t i = 0; i < HW; ++i) z[i] = (xr[i] - mu) * f1 + beta;
        activate_row(z.data(), HW, t.act);
        if (t.round_bf16) round_bf16_row(z.data(), HW);
        masked_row(row(gp, (n * C + c) * HW, HW, gb.data()), z.data(), d.data(), HW, t.act);
        if (mode == kStats) {
          double a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
          for (int64_t i = 0; i < HW; ++i) {
            a1 += d[i];
            a2 += d[i] * (xr[i] - mu);
          }
          t1 += a1;
          t2 += a2;
        } else {
          const float B = t.b ? t.b[c] : 0.f, K = t.b ? t.k0[c] : 0.f;
#pragma omp simd
          for (int64_t i = 0; i < HW; ++i) out[i] = f1 * d[i] + B * (xr[i] - mu) - K;
          if (s.bf16) put(static_cast<at::BFloat16*>(dxs[j]), xo, HW, out.data());
          else put(static_cast<float*>(dxs[j]), xo, HW, out.data());
        }
      }
      s1[c] = t1;
      s2[c] = t2;
    }
  });
}

// sources, mean, F1, beta of the term; act; the applied tensor's dtype (for the mask's rounding).
std::tuple<Tensor, Tensor> grad_stats_x(const Tensor& grad, at::TensorList sources, const Tensor& mean,
                                        const Tensor& f1, const Tensor& beta, int64_t act, at::ScalarType out_dtype) {
  Geo g = geo_of(grad);
  auto terms = terms_of(sources, {static_cast<int64_t>(sources.size())});
  TermBwd t{mean.data_ptr<float>(), f1.data_ptr<float>(), beta.data_ptr<float>(), nullptr, nullptr, act,
            out_dtype == at::kBFloat16};
  std::vector<double> s1, s2;
  std::vector<void*> none;
  typed(grad, [&](auto* gp) {
    if (g.cl) term_backward_cl(gp, terms[0], none, t, g, kStats, s1, s2);
    else term_backward_nchw(gp, terms[0], none, t, g, kStats, s1, s2);
  });
  return {per_channel(s1.data(), g, grad), per_channel(s2.data(), g, grad)};
}

std::vector<Tensor> input_grad_x(const Tensor& grad, at::TensorList sources, const Tensor& mean, const Tensor& f1,
                                 const Tensor& beta, int64_t act, at::ScalarType out_dtype,
                                 const std::optional<Tensor>& b, const Tensor& s1) {
  Geo g = geo_of(grad);
  auto terms = terms_of(sources, {static_cast<int64_t>(sources.size())});
  Tensor k0 = (f1 * s1).contiguous();
  TermBwd t{mean.data_ptr<float>(), f1.data_ptr<float>(), beta.data_ptr<float>(),
            b ? b->data_ptr<float>() : nullptr, k0.data_ptr<float>(), act, out_dtype == at::kBFloat16};
  auto fmt = g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  std::vector<Tensor> out;
  std::vector<void*> ptrs;
  for (const Tensor& x : sources) {
    out.push_back(at::empty(x.sizes(), x.options(), fmt));
    ptrs.push_back(out.back().data_ptr());
  }
  std::vector<double> s1d, s2d;
  typed(grad, [&](auto* gp) {
    if (g.cl) term_backward_cl(gp, terms[0], ptrs, t, g, kDx, s1d, s2d);
    else term_backward_nchw(gp, terms[0], ptrs, t, g, kDx, s1d, s2d);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(bnff, m) {
  m.def("channel_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("apply(Tensor[] sources, int[] n_sources, Tensor[] means, Tensor[] f1s, Tensor[] betas, "
        "Tensor[] residuals, int act, ScalarType out_dtype) -> Tensor");
  m.def("grad_stats(Tensor grad, Tensor? a, int act, Tensor[] sources, int[] n_sources, Tensor[] means) "
        "-> (Tensor, Tensor[], Tensor[])");
  m.def("input_grad(Tensor dy, Tensor[] sources, Tensor mean, Tensor f1, Tensor? b, Tensor s1) -> Tensor[]");
  m.def("grad_stats_x(Tensor grad, Tensor[] sources, Tensor mean, Tensor f1, Tensor beta, int act, "
        "ScalarType out_dtype) -> (Tensor, Tensor)");
  m.def("input_grad_x(Tensor grad, Tensor[] sources, Tensor mean, Tensor f1, Tensor beta, int act, "
        "ScalarType out_dtype, Tensor? b, Tensor s1) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(bnff, CPU, m) {
  m.impl("channel_stats", &channel_stats);
  m.impl("apply", &apply);
  m.impl("grad_stats", &grad_stats);
  m.impl("input_grad", &input_grad);
  m.impl("grad_stats_x", &grad_stats_x);
  m.impl("input_grad_x", &input_grad_x);
}
