// bnff's fused pointwise convolution (issue 31, docs/design.md section 14): a 1x1 convolution (stride
// s, no padding, no bias, one group, channels_last) whose input is a fused group's result, run in
// blocks of B output rows on libxsmm's JIT-generated GEMM micro-kernels:
//   a_blk = act(sum_k BN_k(x_k) + sum_j r_j) on the block's input rows   apply_row, into a per-chunk
//                                                                       buffer that stays in cache
//   y_blk = a_blk W^T                                                   libxsmm: float32, or bfloat16
//                                                                       with float32 accumulation
//   the block's per-channel mean and M2 of y_blk                        while y_blk is in cache
// so the applied map a is never written, and the statistics of y (the next BN's step 1, seed 002
// eq. 1 and 18) need no sweep of their own. Blocks merge their moments chunk by chunk in a fixed
// order (Chan's formula, Moments). With no BN term, one shortcut, no activation and stride 1 the
// block's rows are the input itself: the plain libxsmm 1x1 convolution (bnff bench's floor).
//
// libxsmm is column-major: C (m x n) = A (m x k) B (k x n) with m = C_out, n = the block's rows,
// k = C_in. A channels_last block of rows is B (k x n, leading dimension C_in) and the output rows are
// C (leading dimension C_out); A is the weight, packed once per call: transposed for float32, in
// libxsmm's VNNI layout (pairs of k interleaved) for bfloat16.
// Without libxsmm (BNFF_LIBXSMM undefined at build time) pointwise_target() answers "" and
// pointwise_forward raises; the Python side never calls it then.
#include "bnff_sweeps.h"

#ifdef BNFF_LIBXSMM
#include <libxsmm.h>

#include <cstdlib>
#endif

namespace bnff_cpu {

#ifdef BNFF_LIBXSMM
namespace {

// One JIT kernel C = A B + beta C (alpha 1; beta 0 or 1) of libxsmm, column-major with leading
// dimensions m, k (float32 with trans_b: B given as B^T, leading dimension n), m, A and B of type T, C of
// type TC; null where libxsmm has none for this CPU
// (bfloat16 below AVX-512). bfloat16: A in libxsmm's VNNI layout (pairs of k interleaved), float32
// accumulation over all of k, C rounded to bfloat16 once (nearest even; libxsmm's bmm kernels) or kept
// in float32 (its bsmm kernels: the weight gradient's partial sums).
// Measured on Zen 4 (benchmarks/pointwise_layers.py): panels of output channels and k-blocks that keep
// the weights' block in L1 (beta 1 between k-blocks, float32 C) gained nothing over one call per block
// of rows, so there is none.
template <typename T, typename TC = T>
struct Gemm {
  static constexpr bool f32 = std::is_same_v<T, float>, bf16_out = std::is_same_v<TC, BFloat16>;
  std::conditional_t<f32, libxsmm_smmfunction, std::conditional_t<bf16_out, libxsmm_bmmfunction, libxsmm_bsmmfunction>>
      f = nullptr;
  Gemm(int64_t m, int64_t n, int64_t k, float beta = 0.f, bool trans_b = false) {
    const libxsmm_blasint lda = m, ldb = trans_b ? n : k, ldc = m;
    const float alpha = 1.f;
    if constexpr (f32) {
      const int flags = trans_b ? LIBXSMM_GEMM_FLAG_TRANS_B : LIBXSMM_GEMM_FLAG_NONE;
      f = libxsmm_smmdispatch(m, n, k, &lda, &ldb, &ldc, &alpha, &beta, &flags, nullptr);
    } else if constexpr (bf16_out) {
      const int flags = LIBXSMM_GEMM_FLAG_VNNI_A;
      f = libxsmm_bmmdispatch(m, n, k, &lda, &ldb, &ldc, &alpha, &beta, &flags, nullptr);
    } else {
      const int flags = LIBXSMM_GEMM_FLAG_VNNI_A;
      f = libxsmm_bsmmdispatch(m, n, k, &lda, &ldb, &ldc, &alpha, &beta, &flags, nullptr);
    }
  }
  void operator()(const T* a, const T* b, TC* c) const {
    if constexpr (f32) f(a, b, c);
    else if constexpr (bf16_out)
      f(reinterpret_cast<const libxsmm_bfloat16*>(a), reinterpret_cast<const libxsmm_bfloat16*>(b),
        reinterpret_cast<libxsmm_bfloat16*>(c));
    else
      f(reinterpret_cast<const libxsmm_bfloat16*>(a), reinterpret_cast<const libxsmm_bfloat16*>(b), c);
  }
};

// Element (i, j) of a column-major (m x k) operand A at p[i + j * m], or, for bfloat16, where libxsmm's
// VNNI layout puts it (pairs of k interleaved).
template <typename T>
BNFF_INLINE int64_t a_at(int64_t i, int64_t j, int64_t m) {
  if constexpr (std::is_same_v<T, float>) return i + j * m;
  else return ((j / 2) * m + i) * 2 + j % 2;
}

// The weight (C_out, C_in, 1, 1) as libxsmm's A: float32 transposed (k-major), bfloat16 in VNNI pairs.
// dgrad's A is the weight as it lies ((C_in x C_out) column-major, k = C_out): float32 as is, bfloat16 in
// VNNI pairs of output channels.
template <typename T>
std::vector<T> pack_weight(const T* w, int64_t cout, int64_t cin, bool dgrad = false) {
  std::vector<T> p(cout * cin);
  for (int64_t m = 0; m < cout; ++m)
    for (int64_t k = 0; k < cin; ++k) p[dgrad ? a_at<T>(k, m, cin) : a_at<T>(m, k, cout)] = w[m * cin + k];
  return p;
}

// Rows per block when the caller leaves it (block_rows 0): the block's a and y together in about
// 256 KiB (a quarter of Zen 4's L2, half of Skylake-SP's), 16 to 512 rows, a multiple of 16.
int64_t auto_block_rows(int64_t cin, int64_t cout, int64_t elem) {
  const int64_t rows = (int64_t(256) << 10) / ((cin + cout) * elem);
  return std::clamp<int64_t>(rows / 16 * 16, 16, 512);
}

// The block's per-channel moments of y (nb rows of C channels, in cache), merged into mo[0, C): two
// passes per vector of channels (float32 mean, then centred sums), as channel_stats does per block.
template <typename T>
void block_moments(const T* y, int64_t nb, int64_t C, Moments* mo) {
  vectors(0, C, [&](int64_t c0, auto w) {
    V s(0.f);
    for (int64_t r = 0; r < nb; ++r) s += ld(y + r * C + c0, w);
    const V mb = s / V(static_cast<float>(nb));
    V sd(0.f), q(0.f);
    for (int64_t r = 0; r < nb; ++r) {
      const V d = ld(y + r * C + c0, w) - mb;
      sd += d;
      q += d * d;
    }
    const auto m = lanes(mb), d1 = lanes(sd), d2 = lanes(q);
    for (int64_t i = 0; i < static_cast<int64_t>(w); ++i)
      mo[c0 + i].merge(nb, m[i] + double(d1[i]) / nb, std::max(0.0, double(d2[i]) - double(d1[i]) * d1[i] / nb));
  });
}

template <typename TX, typename TO>
void pointwise_kernel(const std::vector<std::vector<Src>>& terms, const std::vector<TermVec>& vec,
                      const std::vector<Src>& residuals, int64_t act_arg, const Tensor& like, const Tensor& weight,
                      int64_t stride, int64_t block_rows, const Tensor& y, std::vector<Moments>* stats) {
  const int64_t act = act_for<TX>(act_arg);
  const int64_t K = terms.size(), R = residuals.size();
  const int64_t cout = weight.size(0), cin = weight.size(1);
  const int64_t H = like.size(2), Wd = like.size(3), Ho = y.size(2), Wo = y.size(3);
  const int64_t rows = y.size(0) * Ho * Wo;
  const int64_t B = block_rows > 0 ? block_rows : auto_block_rows(cin, cout, sizeof(TO));
  const int64_t nblk = (rows + B - 1) / B, tail = rows - (nblk - 1) * B;
  const Gemm<TO> full(cout, B, cin), last(cout, tail, cin);
  TORCH_CHECK(full.f && last.f, "bnff pointwise: libxsmm has no ", sizeof(TO) == 2 ? "bfloat16" : "float32",
              " GEMM kernel for this CPU (target ", libxsmm_get_target_arch(), ")");
  const std::vector<TO> wp = pack_weight(weight.data_ptr<TO>(), cout, cin);
  const TX* rp[kMaxTerms];
  for (int64_t j = 0; j < R; ++j) rp[j] = residuals[j].at<TX>();
  // the input row of output row r
  auto in_row = [&](int64_t r) {
    if (stride == 1) return r;
    const int64_t n = r / (Ho * Wo), ho = r / Wo % Ho, wo = r % Wo;
    return (n * H + ho * stride) * Wd + wo * stride;
  };
  const bool direct = K == 0 && R == 1 && act == kNone && stride == 1 && std::is_same_v<TX, TO>;
  const auto sp = seg_ptrs<TX>(segments(cin, terms), terms);
  const int64_t nc = std::min<int64_t>(nblk, 8 * at::get_num_threads());
  std::vector<std::vector<Moments>> chunk_mo(stats ? nc : 0, std::vector<Moments>(stats ? cout : 0));
  TO* out = y.data_ptr<TO>();
  with_act<true, TX>(act, [&](auto A) {
    with_terms_for(A, K, R, [&](auto KK, auto RR) {
      at::parallel_for(0, nc, 1, [&](int64_t b, int64_t e) {
        std::vector<TO> a_blk(direct ? 0 : B * cin);
        std::vector<float> buf(runtime_act<decltype(A)> ? cin : 0);
        for (int64_t ch = b; ch < e; ++ch)
          for (int64_t blk = ch * nblk / nc; blk < (ch + 1) * nblk / nc; ++blk) {
            const int64_t r0 = blk * B, nb = std::min(B, rows - r0);
            const TO* a = a_blk.data();  // the block applied in cache, or (direct) the input rows themselves
            if (!direct) {
              for (int64_t i = 0; i < nb; ++i)
                apply_row(KK, RR, A, sp, vec.data(), rp, cin, in_row(r0 + i), a_blk.data() + i * cin, buf.data());
            } else if constexpr (std::is_same_v<TX, TO>) {
              a = rp[0] + r0 * cin;
            }
            (nb == B ? full : last)(wp.data(), a, out + r0 * cout);
            if (stats) block_moments(out + r0 * cout, nb, cout, chunk_mo[ch].data());
          }
      });
    });
  });
  if (stats)
    for (int64_t c = 0; c < cout; ++c)
      for (int64_t ch = 0; ch < nc; ++ch) (*stats)[c].merge(chunk_mo[ch][c].n, chunk_mo[ch][c].mean, chunk_mo[ch][c].m2);
}

// dst (c x kk, column-major) = the nb rows of c values at src, transposed, rows nb..kk zero: in 16 x 16
// tiles, each read and written a cache line at a time.
template <typename T>
void transpose_rows(const T* src, int64_t nb, int64_t kk, int64_t c, T* dst) {
  constexpr int64_t t = 16;
  for (int64_t i0 = 0; i0 < kk; i0 += t)
    for (int64_t c0 = 0; c0 < c; c0 += t) {
      const int64_t i1 = std::min(i0 + t, kk), c1 = std::min(c0 + t, c);
      for (int64_t j = c0; j < c1; ++j)
        for (int64_t i = i0; i < i1; ++i) dst[j * kk + i] = i < nb ? src[i * c + j] : T(0.f);
    }
}

// nb rows of c values at src as libxsmm's VNNI operand of k = kk rows (pairs of rows interleaved:
// dst[(i / 2) 2c + 2 j + i % 2] = src[i c + j]), rows nb..kk zero.
template <typename T>
void vnni_rows(const T* src, int64_t nb, int64_t kk, int64_t c, T* dst) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < kk; i += 2, d += c) {
    const uint16_t* r0 = s + i * c;
    if (i + 1 < nb) {
      const uint16_t* r1 = r0 + c;
      for (int64_t j = 0; j < c; ++j) d[j] = uint32_t(r0[j]) | (uint32_t(r1[j]) << 16);
    } else {
      for (int64_t j = 0; j < c; ++j) d[j] = i < nb ? uint32_t(r0[j]) : 0u;
    }
  }
}

// Rows per block of the backward: the block's a, dy^T and g (dgrad's output) in about 256 KiB, but at
// least as many rows as make the weight gradient's float32 partial (C_in x C_out), read and written once
// per block, move no more bytes than the block's operands; 16 to 4096 rows, a multiple of 16.
int64_t backward_block_rows(int64_t cin, int64_t cout, int64_t elem) {
  const int64_t cache = (int64_t(256) << 10) / ((2 * cin + cout) * elem);
  const int64_t partial = 2 * cin * cout * int64_t(sizeof(float)) / ((cin + cout) * elem);
  return std::clamp<int64_t>(std::max(cache, partial) / 16 * 16, 16, 4096);
}

// The backward of a lone group's 1x1 consumer (stride 1) with the group's grad_stats_x, per block of
// rows: g = dy W (dgrad, written: input_grad_x reads it), S1 and S2 of g with x (lone_block_stats, g and
// x in cache), a recomputed from x (apply_row: the forward's bits) and dW += a^T dy (wgrad, a per-chunk
// float32 partial, chunks summed in a fixed order). One chunk per thread.
template <typename T>
void pointwise_backward_kernel(const std::vector<Src>& srcs, const TermVec& vec, const TermBwd& tb, const Tensor& dy,
                               const Tensor& weight, bool wgrad, int64_t block_rows, const Tensor& g, float* dw,
                               std::vector<double>& s1, std::vector<double>& s2) {
  constexpr bool f32 = std::is_same_v<T, float>;
  const int64_t act = act_for<T>(tb.act);
  const int64_t cout = weight.size(0), cin = weight.size(1);
  const int64_t rows = dy.size(0) * dy.size(2) * dy.size(3);
  const int64_t b0 = block_rows > 0 ? block_rows : backward_block_rows(cin, cout, sizeof(T));
  const int64_t B = f32 ? b0 : (b0 + 1) / 2 * 2;  // bfloat16 wgrad: k = rows in VNNI pairs
  const int64_t nblk = (rows + B - 1) / B, tail = rows - (nblk - 1) * B, tail_k = f32 ? tail : (tail + 1) / 2 * 2;
  const Gemm<T> dg_full(cin, B, cout), dg_last(cin, tail, cout);
  // wgrad, dW (C_in x C_out, column-major) += a_blk (C_in x rows) dy_blk^T, one operand transposed: float32
  // reads the dy rows as they lie (libxsmm's trans_b); bfloat16 (libxsmm 1.17 has no trans_b bf16 kernel)
  // transposes the narrower of a and dy per block and packs the other in VNNI pairs of rows, so with
  // C_in < C_out it forms dW^T (C_out x C_in) += dy_blk (VNNI) a_blk^T instead
  const bool swap = !f32 && cin < cout;
  const int64_t wm = swap ? cout : cin, wn = swap ? cin : cout;
  const Gemm<T, float> wg_full(wm, wn, B, 1.f, f32), wg_last(wm, wn, tail_k, 1.f, f32);
  TORCH_CHECK(dg_full.f && dg_last.f && wg_full.f && wg_last.f, "bnff pointwise: libxsmm has no ",
              f32 ? "float32" : "bfloat16", " GEMM kernel for this CPU (target ", libxsmm_get_target_arch(), ")");
  const std::vector<T> wp = pack_weight(weight.data_ptr<T>(), cout, cin, true);
  const int64_t nc = std::min<int64_t>(nblk, at::get_num_threads());
  std::vector<float> part(wgrad ? nc * cin * cout : 0, 0.f);
  std::vector<double> p1(nc * cin, 0.0), p2(nc * cin, 0.0);
  const auto sp = seg_ptrs<T>(segments(cin, {srcs}), {srcs});
  const T* dyp = dy.data_ptr<T>();
  T* gp = g.data_ptr<T>();
  const auto st = c10::CppTypeToScalarType<T>::value;
  const bool plain = vec.mu == nullptr;  // no BN: the plain convolution backward of x, no statistics
  const T* xp = srcs[0].at<T>();
  with_act<true, T>(act, [&](auto A) {
    with_terms_for(A, 1, 0, [&](auto KK, auto RR) {
      at::parallel_for(0, nc, 1, [&](int64_t b, int64_t e) {
        // float32: op_a holds a's rows (libxsmm's A); bfloat16: a's rows in a_rows, then the two operands
        std::vector<T> op_a(wgrad ? B * std::max(cin, cout) : 0), a_rows(wgrad && !f32 ? B * cin : 0),
            op_b(wgrad && !f32 ? B * std::max(cin, cout) : 0);
        std::vector<float> buf(runtime_act<decltype(A)> ? cin : 0);
        for (int64_t ch = b; ch < e; ++ch)
          for (int64_t blk = ch * nblk / nc; blk < (ch + 1) * nblk / nc; ++blk) {
            const int64_t r0 = blk * B, nb = std::min(B, rows - r0), kk = nb == B ? B : tail_k;
            (nb == B ? dg_full : dg_last)(wp.data(), dyp + r0 * cout, gp + r0 * cin);
            if (!plain) lone_block_stats(srcs, tb, st, gp, st, cin, r0, nb, &p1[ch * cin], &p2[ch * cin]);
            if (!wgrad) continue;
            const T* a = xp + r0 * cin;  // the block's rows of a: x itself, or applied into a buffer
            if (!plain) {
              T* rows_out = f32 ? op_a.data() : a_rows.data();
              for (int64_t i = 0; i < nb; ++i)
                apply_row(KK, RR, A, sp, &vec, static_cast<const T* const*>(nullptr), cin, r0 + i, rows_out + i * cin,
                          buf.data());
              a = rows_out;
            }
            if constexpr (!f32) {
              if (swap) {
                vnni_rows(dyp + r0 * cout, nb, kk, cout, op_a.data());
                transpose_rows(a, nb, kk, cin, op_b.data());
              } else {
                vnni_rows(a, nb, kk, cin, op_a.data());
                transpose_rows(dyp + r0 * cout, nb, kk, cout, op_b.data());
              }
            }
            (nb == B ? wg_full : wg_last)(f32 ? a : op_a.data(), f32 ? dyp + r0 * cout : op_b.data(),
                                          part.data() + ch * cin * cout);
          }
      });
    });
  });
  add_chunks(p1, nc, cin, s1.data());
  add_chunks(p2, nc, cin, s2.data());
  for (int64_t co = 0; wgrad && co < cout; ++co)
    for (int64_t ci = 0; ci < cin; ++ci) {
      const int64_t at = swap ? ci * cout + co : co * cin + ci;
      float sum = 0.f;
      for (int64_t ch = 0; ch < nc; ++ch) sum += part[ch * cin * cout + at];
      dw[co * cin + ci] = sum;
    }
}

}  // namespace
#endif

std::string pointwise_target(std::string target) {
#ifdef BNFF_LIBXSMM
  static std::once_flag once;
  std::call_once(once, [&] {
    // libxsmm_init pins threads when no affinity is set: it puts OMP_PROC_BIND=TRUE into the environment
    // (libxsmm 1.17, src/libxsmm_main.c, LIBXSMM_AUTOPIN), and the OpenMP threads ATen starts later then
    // share one core (ResNet-50's training step measured 7x slower on 2 cores). What the user had set is kept.
    const bool had_bind = std::getenv("OMP_PROC_BIND") != nullptr;
    libxsmm_init();  // (it reads the CPU and LIBXSMM_TARGET; a target set before it is overwritten)
    if (!had_bind) unsetenv("OMP_PROC_BIND");
    if (!std::getenv("LIBXSMM_TARGET") && !target.empty()) libxsmm_set_target_arch(target.c_str());
  });
  return libxsmm_get_target_arch();
#else
  (void)target;
  return "";
#endif
}

bool pointwise_has(at::ScalarType dtype) {
#ifdef BNFF_LIBXSMM  // (after pointwise_target: the Python side calls that first)
  // every kind of kernel the forward and the backward dispatch
  if (dtype == at::kFloat) return Gemm<float>(16, 16, 16).f && Gemm<float, float>(16, 16, 16, 1.f, true).f;
  if (dtype == at::kBFloat16) return Gemm<BFloat16>(16, 16, 16).f && Gemm<BFloat16, float>(16, 16, 16, 1.f).f;
#else
  (void)dtype;
#endif
  return false;
}

std::tuple<Tensor, Tensor, Tensor> pointwise_forward(at::TensorList sources, at::IntArrayRef n_sources,
                                                     at::TensorList means, at::TensorList f1s, at::TensorList betas,
                                                     at::TensorList residuals, int64_t act, const Tensor& weight,
                                                     int64_t stride, bool stats, int64_t block_rows, int64_t layout) {
#ifdef BNFF_LIBXSMM
  TORCH_CHECK(!sources.empty() || !residuals.empty(), "bnff pointwise: nothing to apply");
  TORCH_CHECK(layout == BNFF_LAYOUT_NHWC, "bnff pointwise: channels_last feature maps only");
  const Tensor& like = residuals.empty() ? sources[0] : residuals[0];
  const Geo g = geo_of(like, layout);
  const Tensor& feature = sources.empty() ? like : sources[0];
  count(kPointwise, true, feature);
  int64_t C = 0;
  for (int64_t j = 0; j < (n_sources.empty() ? 0 : n_sources[0]); ++j) C += sources[j].size(1);
  if (sources.empty()) C = like.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1 && weight.is_contiguous() &&
                  weight.size(1) == C,
              "bnff pointwise: the weight must be a contiguous (C_out, ", C, ", 1, 1) tensor, got ", weight.sizes());
  TORCH_CHECK(stride >= 1, "bnff pointwise: stride must be at least 1");
  const auto wt = weight.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16, "bnff pointwise: float32 or bfloat16 weights only");
  TORCH_CHECK(wt == at::kBFloat16 || feature.scalar_type() == at::kFloat,
              "bnff pointwise: float32 weights need float32 feature maps");
  TORCH_CHECK(wt != at::kBFloat16 || C % 2 == 0, "bnff pointwise: bfloat16 needs an even number of input channels");
  const int64_t Ho = (like.size(2) - 1) / stride + 1, Wo = (like.size(3) - 1) / stride + 1;
  Tensor y = workspace_empty({g.n, weight.size(0), Ho, Wo}, like.options().dtype(wt), true);
  auto terms = terms_of(sources, n_sources);
  auto vec = vecs_of(means, f1s, betas);
  std::vector<Src> res;
  for (const Tensor& r : residuals) res.push_back(Src{r.data_ptr(), C, 0});
  std::vector<Moments> mo(stats ? weight.size(0) : 0);
  BNFF_DISPATCH(feature.scalar_type(), "bnff::pointwise_forward", [&] {
    using TX = scalar_t;
    if (wt == at::kFloat) {
      if constexpr (std::is_same_v<TX, float>)
        pointwise_kernel<TX, float>(terms, vec, res, act, like, weight, stride, block_rows, y, stats ? &mo : nullptr);
    } else {
      pointwise_kernel<TX, BFloat16>(terms, vec, res, act, like, weight, stride, block_rows, y, stats ? &mo : nullptr);
    }
  });
  Tensor mean = at::empty({stats ? weight.size(0) : 0}, like.options().dtype(at::kFloat)), var = at::empty_like(mean);
  for (size_t c = 0; c < mo.size(); ++c) {
    mean.data_ptr<float>()[c] = static_cast<float>(mo[c].mean);
    var.data_ptr<float>()[c] = static_cast<float>(mo[c].m2 / mo[c].n);
  }
  return {y, mean, var};
#else
  (void)sources, (void)n_sources, (void)means, (void)f1s, (void)betas, (void)residuals, (void)act, (void)weight,
      (void)stride, (void)stats, (void)block_rows, (void)layout;
  TORCH_CHECK(false, "bnff pointwise: the kernels were built without libxsmm (install Debian's libxsmm-dev and "
              "rebuild: bnff.ops.backends.cpu.libxsmm() says why it was not found)");
#endif
}

std::tuple<Tensor, Tensor, Tensor, Tensor> pointwise_backward(at::TensorList sources,
                                                              const std::optional<Tensor>& mean,
                                                              const std::optional<Tensor>& f1,
                                                              const std::optional<Tensor>& beta, int64_t act,
                                                              const Tensor& dy, const Tensor& weight, bool wgrad,
                                                              int64_t block_rows, int64_t layout) {
#ifdef BNFF_LIBXSMM
  const bool plain = !mean.has_value();
  TORCH_CHECK(!plain || (sources.size() == 1 && act == kNone && !f1 && !beta),
              "bnff pointwise_backward: without a BN (no mean), one input map, no F1, beta or activation");
  TORCH_CHECK(!sources.empty(), "bnff pointwise_backward: no BN input");
  TORCH_CHECK(layout == BNFF_LAYOUT_NHWC, "bnff pointwise_backward: channels_last feature maps only");
  const auto dt = sources[0].scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && dy.scalar_type() == dt && weight.scalar_type() == dt,
              "bnff pointwise_backward: the BN inputs, dy and the weight must be all float32 or all bfloat16");
  int64_t C = 0;
  for (const Tensor& x : sources) C += x.size(1);
  const Tensor& x0 = sources[0];
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1 && weight.is_contiguous() &&
                  weight.size(1) == C,
              "bnff pointwise_backward: the weight must be a contiguous (C_out, ", C, ", 1, 1) tensor, got ",
              weight.sizes());
  TORCH_CHECK(dy.dim() == 4 && dy.size(0) == x0.size(0) && dy.size(1) == weight.size(0) && dy.size(2) == x0.size(2) &&
                  dy.size(3) == x0.size(3) && dy.is_contiguous(at::MemoryFormat::ChannelsLast),
              "bnff pointwise_backward: dy must be a channels_last (", x0.size(0), ", ", weight.size(0), ", ",
              x0.size(2), ", ", x0.size(3), ") tensor (stride 1), got ", dy.sizes());
  TORCH_CHECK(dt == at::kFloat || (C % 2 == 0 && weight.size(0) % 2 == 0),
              "bnff pointwise_backward: bfloat16 needs even channel counts");
  count(kPointwiseBwd, true, x0);
  Tensor g = workspace_empty({x0.size(0), C, x0.size(2), x0.size(3)}, x0.options(), true);
  Tensor dw = at::empty({wgrad ? weight.size(0) : 0, C, 1, 1}, weight.options().dtype(at::kFloat));
  const auto srcs = terms_of(sources, {static_cast<int64_t>(sources.size())})[0];
  const TermVec vec = plain ? TermVec{nullptr, nullptr, nullptr}
                            : TermVec{mean->data_ptr<float>(), f1->data_ptr<float>(), beta->data_ptr<float>()};
  const TermBwd tb{vec.mu, vec.f1, vec.beta, nullptr, nullptr, act, dt == at::kBFloat16};
  std::vector<double> s1(C, 0.0), s2(C, 0.0);  // (zeros without a BN)
  if (dt == at::kFloat)
    pointwise_backward_kernel<float>(srcs, vec, tb, dy, weight, wgrad, block_rows, g, dw.data_ptr<float>(), s1, s2);
  else
    pointwise_backward_kernel<BFloat16>(srcs, vec, tb, dy, weight, wgrad, block_rows, g, dw.data_ptr<float>(), s1, s2);
  const Geo geo = geo_of(g, layout);
  return {g, wgrad ? dw.to(weight.scalar_type()) : dw, per_channel(s1.data(), geo, g), per_channel(s2.data(), geo, g)};
#else
  (void)sources, (void)mean, (void)f1, (void)beta, (void)act, (void)dy, (void)weight, (void)wgrad, (void)block_rows,
      (void)layout;
  TORCH_CHECK(false, "bnff pointwise: the kernels were built without libxsmm (install Debian's libxsmm-dev and "
              "rebuild: bnff.ops.backends.cpu.libxsmm() says why it was not found)");
#endif
}

}  // namespace bnff_cpu
