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

// One JIT kernel C = A B (alpha 1, beta 0) of libxsmm for operands of type T (m = C_out, n = rows,
// k = C_in); null where libxsmm has none for this CPU (bfloat16 below AVX-512). bfloat16: libxsmm's
// bmm kernels, float32 accumulation over all of k, C rounded to bfloat16 once (nearest even).
// Measured on Zen 4 (benchmarks/pointwise_layers.py): panels of output channels and k-blocks that keep
// the weights' block in L1 (beta 1 between k-blocks, float32 C) gained nothing over one call per block
// of rows, so there is none.
template <typename T>
struct Gemm {
  std::conditional_t<std::is_same_v<T, float>, libxsmm_smmfunction, libxsmm_bmmfunction> f = nullptr;
  Gemm(int64_t m, int64_t n, int64_t k) {
    const libxsmm_blasint lda = m, ldb = k, ldc = m;
    const float alpha = 1.f, beta = 0.f;
    if constexpr (std::is_same_v<T, float>) {
      const int flags = LIBXSMM_GEMM_FLAG_NONE;
      f = libxsmm_smmdispatch(m, n, k, &lda, &ldb, &ldc, &alpha, &beta, &flags, nullptr);
    } else {
      const int flags = LIBXSMM_GEMM_FLAG_VNNI_A;
      f = libxsmm_bmmdispatch(m, n, k, &lda, &ldb, &ldc, &alpha, &beta, &flags, nullptr);
    }
  }
  void operator()(const T* a, const T* b, T* c) const {
    if constexpr (std::is_same_v<T, float>) f(a, b, c);
    else
      f(reinterpret_cast<const libxsmm_bfloat16*>(a), reinterpret_cast<const libxsmm_bfloat16*>(b),
        reinterpret_cast<libxsmm_bfloat16*>(c));
  }
};

// The weight (C_out, C_in, 1, 1) as libxsmm's A: float32 transposed (k-major), bfloat16 in VNNI pairs.
template <typename T>
std::vector<T> pack_weight(const T* w, int64_t cout, int64_t cin) {
  std::vector<T> p(cout * cin);
  for (int64_t m = 0; m < cout; ++m)
    for (int64_t k = 0; k < cin; ++k) {
      if constexpr (std::is_same_v<T, float>) p[k * cout + m] = w[m * cin + k];
      else p[((k / 2) * cout + m) * 2 + k % 2] = w[m * cin + k];
    }
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
  if (dtype == at::kFloat) return Gemm<float>(16, 16, 16).f != nullptr;
  if (dtype == at::kBFloat16) return Gemm<BFloat16>(16, 16, 16).f != nullptr;
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

}  // namespace bnff_cpu
