// bnff's fused CPU sweeps: what the kernels of bnff_cpu.cpp (forward, vectors, registration),
// bnff_backward.cpp (grad_stats, input_grad) and bnff_lone.cpp (the lone-term backward) share:
// vectors, loads and stores, the workspace, the formulas (BN terms and every activation of
// bnff.activations), the geometry of a call and its loop helpers. Separate translation units, so the
// build uses both cores; every kernel that recomputes a value calls the one formula written here, so
// recompute equals the forward bit for bit.
//
// The same four sweeps as bnff/ops/backends/reference.py, same arguments, same math (seed 002
// eq. 1, 9, 12, 16-20, in centered form), registered as torch.library ops "bnff::*":
//   channel_stats  step 1 forward: per-channel mean and biased variance, one read (MVF)
//   apply          step 2 forward: a = act(sum_k F1_k (x_k - mu_k) + beta_k + sum_j r_j), one read
//                  of every input, one write of a
//   grad_stats     step 1 backward: dy = g * act'(a or z), S1 = sum dy / m, S2c = sum dy (x - mu) / m
//   input_grad     step 2 backward: dx = F1 dy + B (x - mu) - F1 S1, written onto each source map
//   grad_stats_x, input_grad_x  the same two for a lone BN term without shortcut, dy never written:
//                  each sweep recomputes the activation's derivative from x, which it reads anyway
// A BN input may be several source maps (DenseNet ICF): they are read in place, never concatenated.
// Layouts: every tensor of a call either channels_last (rows of C channels) or contiguous NCHW
// (planes of H*W). The Python side decides which (its rule is the only one), passes it as `layout`
// and falls back to the reference for anything else; here it is only checked.
// Constants shared with Python (activation codes, layout codes, the most BN terms or shortcuts of a
// call) are defined there (bnff/ops/backends/cpu.py) and passed as -D flags at build time, with
// ATen's CPU_CAPABILITY macros of the level the kernels are built for.
// Element types: float32 or bfloat16 (one type for a call's feature maps, another for its gradient),
// dispatched with AT_DISPATCH, accumulated in float32 within blocks and in double across blocks.
//
// Vectors are ATen's at::vec::Vectorized<float> (16 lanes at the AVX-512 level, 8 at AVX2). Each
// step's formula is written once, on vectors (section "the formulas"), and both layouts run it:
// a channels_last vector holds consecutive channels of one row (per-channel constants loaded as
// vectors), an NCHW vector consecutive positions of one channel's plane (constants broadcast).
// The channels_last loops make the activation, the usual numbers of BN terms and shortcuts, and a
// full vector width compile-time constants; the NCHW loops (the uncommon layout) take the first two
// at run time, which keeps the build short.
#pragma once

// Only the ATen headers the kernels use (torch/extension.h takes 4x as long to compile; torch/library.h
// and ATen/TensorOperators.h double a translation unit's time, so only bnff_cpu.cpp, which registers
// the ops, includes the first, and nothing the second).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/strides.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>
namespace bnff_cpu {


using at::BFloat16;
using at::Tensor;
using V = at::vec::Vectorized<float>;
constexpr int64_t W = V::size();

#define BNFF_INLINE inline __attribute__((always_inline))
// The per-vector lambdas of the loops: GCC's size limits would otherwise leave some as calls per vector.
#define BNFF_LAMBDA __attribute__((always_inline))

// The kernels' element types, float32 and bfloat16: `scalar_t` in the body. Anything else is
// ATen's "not implemented for" error (the Python side never sends it).
#define BNFF_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// ---- loads and stores of n <= W lanes as float ----------------------------------------------------
BNFF_INLINE V ld(const float* p, int64_t n) { return n == W ? V::loadu(p) : V::loadu(p, n); }
BNFF_INLINE V ld(const BFloat16* p, int64_t n) {
  V v;
  if (n == W) {
    at::vec::load_to_float(p, v);
  } else {
    BFloat16 buf[W];
    std::memset(buf, 0, sizeof buf);
    std::memcpy(buf, p, n * sizeof(BFloat16));
    at::vec::load_to_float(buf, v);
  }
  return v;
}
BNFF_INLINE void st(float* p, V v, int64_t n) {
  if (n == W) v.store(p);
  else v.store(p, n);
}

// float -> bfloat16, rounded to nearest even. Where the build level has AVX512_BF16 (the
// "avx512_bf16" level) one VCVTNEPS2BF16, which treats float32 subnormals (|v| < 2^-126) as zero:
// the apply step is 1.3x faster with it on Zen 4 than with ATen's conversion, which keeps
// subnormals. Every kernel of a build rounds through here, so a recomputed activation and its mask
// match the stored one bit for bit.
#if defined(__AVX512BF16__) && defined(CPU_CAPABILITY_AVX512)
BNFF_INLINE void st(BFloat16* p, V v, int64_t n) {
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  if (n == W) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  else _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), h);
}
BNFF_INLINE V round_bf16(V v) {
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#else
BNFF_INLINE void st(BFloat16* p, V v, int64_t n) { at::vec::convert_float_bfloat16(v, v).store(p, n); }
BNFF_INLINE V round_bf16(V v) { return std::get<0>(at::vec::convert_bfloat16_float(at::vec::convert_float_bfloat16(v, v))); }
#endif

// The lanes of v, and their sum in double.
BNFF_INLINE std::array<float, W> lanes(V v) {
  std::array<float, W> a;
  v.store(a.data());
  return a;
}
BNFF_INLINE double lane_sum(V v, int64_t n = W) {
  const auto a = lanes(v);
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i];
  return s;
}

// Count, mean and M2 = sum (x - mean)^2 of one channel, merged block by block with Chan's formula in
// double (channel_stats, the fused pointwise convolution's statistics of its output).
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

// ---- workspace: the sweeps' large outputs reuse freed blocks ------------------------------------
// A training step allocates the same large tensors every step (applied maps, dy, dx). From the
// system allocator each would be fresh pages, faulted in and zeroed by the kernel on first touch
// (glibc maps blocks over 32 MiB anew each time and trims freed heap). The pool keeps freed blocks
// by exact size, up to a limit in bytes (BNFF_WORKSPACE_BYTES, default 2 GiB); above it, or below
// kPoolMin bytes, blocks go back to the system.
constexpr size_t kPoolMin = size_t(1) << 20;

class Workspace {
 public:
  static Workspace& get() {
    static Workspace* w = new Workspace();  // never destroyed: tensors may outlive static teardown
    return *w;
  }
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        held_ -= bytes;
        return p;
      }
    }
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, 64, bytes) == 0, "bnff cpu backend: out of memory allocating ", bytes, " bytes");
    return p;
  }
  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (held_ + bytes <= limit_) {
        free_[bytes].push_back(p);
        held_ += bytes;
        return;
      }
    }
    std::free(p);
  }
  int64_t release() {  // free every held block; returns the bytes freed
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& kv : free_)
      for (void* p : kv.second) std::free(p);
    free_.clear();
    const int64_t n = held_;
    held_ = 0;
    return n;
  }
  int64_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    return held_;
  }

 private:
  Workspace() {
    const char* env = std::getenv("BNFF_WORKSPACE_BYTES");
    limit_ = env ? static_cast<size_t>(std::strtoull(env, nullptr, 10)) : (size_t(2) << 30);
  }
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t held_ = 0, limit_;
};

// An uninitialized (N, C, H, W) tensor in the given layout, from the workspace when large.
inline Tensor workspace_empty(at::IntArrayRef sizes, const at::TensorOptions& opts, bool channels_last) {
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
  if (bytes < kPoolMin) return at::empty(sizes, opts, fmt);
  void* p = Workspace::get().take(bytes);
  std::vector<int64_t> strides;
  if (channels_last) {
    strides = c10::get_channels_last_strides_2d(sizes);
  } else {
    auto cs = c10::contiguous_strides(sizes);
    strides.assign(cs.begin(), cs.end());
  }
  return at::for_blob(p, sizes)
      .strides(strides)
      .deleter([bytes](void* q) { Workspace::get().give(q, bytes); })
      .options(opts)
      .make_tensor();
}

#if !defined(BNFF_ACT_NONE) || !defined(BNFF_ACT_RELU) || !defined(BNFF_ACT_RELU6) || !defined(BNFF_ACT_FROM_Z) || \
    !defined(BNFF_ACT_FAST_EXP) || \
    !defined(BNFF_ACT_MISH) || !defined(BNFF_MAX_TERMS) || !defined(BNFF_LAYOUT_NHWC)
#error "the bnff kernels are built by bnff.ops.backends.cpu, which passes the constants it shares with Python"
#endif

// ---- the formulas, on W lanes (channels of a row, or positions of a plane) -----------------------
// A BN term's contribution to z: F1 (x - mu) + beta (seed 002 eq. 12 with F1 = gamma / sigma), in the
// centred form, each operation rounded,
// as the reference backend forms it (reference.term): no cancellation when |mu| >> std, and near an
// activation threshold as close to float64 as eager's x * alpha + (beta - mu alpha)
// (tests/test_patterns.py::test_apply_near_a_threshold_as_accurate_as_eager).
BNFF_INLINE V term(V x, V mu, V f1, V beta) { return (x - mu) * f1 + beta; }

// ---- the activations of bnff.activations' table -------------------------------------------------
// The sweeps' `act` argument (cpu.act_arg writes it): bits 0-7 the activation's code (BNFF_ACT_*,
// cpu.ACT_CODES), bit 8 (BNFF_ACT_FROM_Z) set when its derivative is taken at the pre-activation z
// rather than from the output a (the table's `reads`), bits 32-63 its parameter as float32 bits
// (LeakyReLU's slope, ELU's and CELU's alpha). No activation, ReLU and ReLU6 are bare codes, which
// the channels_last loops make compile-time constants (with_act), as they make SiLU and Hardswish
// (today's networks' activations: EfficientNet, YOLO, MobileNetV3); every other activation runs through act_forward / act_grad: one
// switch per vector, compiled once per translation unit. Bit 9 (BNFF_ACT_FAST_EXP), set by the kernels
// themselves on SiLU over bfloat16 maps (act_for), takes SiLU's exponential as ATen's exp_u20 (its
// softmax's: 20 ulp of float32, 2^-18 relative, far below bfloat16's half ulp of 2^-9) instead of
// SLEEF's 1-ulp expf: the exponential was two thirds of the SiLU apply sweep's time on Zen 4.
enum Act : int64_t {
  kNone = BNFF_ACT_NONE,
  kRelu = BNFF_ACT_RELU,
  kRelu6 = BNFF_ACT_RELU6,
  kSilu = BNFF_ACT_SILU | BNFF_ACT_FROM_Z,
  kSiluFast = BNFF_ACT_SILU | BNFF_ACT_FROM_Z | BNFF_ACT_FAST_EXP,
  kHardswish = BNFF_ACT_HARDSWISH | BNFF_ACT_FROM_Z,
};
constexpr int64_t act_code(int64_t act) { return act & 0xff; }
constexpr bool from_z(int64_t act) { return (act & BNFF_ACT_FROM_Z) != 0; }
constexpr float act_param(int64_t act) { return std::bit_cast<float>(static_cast<uint32_t>(static_cast<uint64_t>(act) >> 32)); }

// Each activation's formulas, on vectors: fwd(z) = f(z) and grad(g, t) = g * f'(t), t the output a or
// the pre-activation z as the act argument's BNFF_ACT_FROM_Z bit says, with ATen's vectorized formulas
// (aten/src/ATen/native/cpu/Activation.cpp: the forward kernels and the backward operators
// threshold_backward, leaky_relu_backward, elu_backward, silu_backward, hardswish_backward,
// hardsigmoid_backward, sigmoid_backward, tanh_backward, gelu_backward, mish_backward); exp, expm1,
// erf, tanh and log1p are ATen's Vectorized functions (SLEEF's at the AVX2 and AVX-512 levels).
namespace act {
inline const V zero(0.f), one(1.f), half(0.5f), three(3.f), six(6.f);
struct Identity {
  V fwd(V z) const { return z; }
  V grad(V g, V) const { return g; }
};
struct Relu {  // NaN stays NaN; the mask of a NaN is 0, as in eager's threshold backward
  V fwd(V z) const { return at::vec::clamp_min(z, zero); }
  V grad(V g, V a) const { return g & (a > zero); }  // a > 0 iff z > 0
};
struct Relu6 {
  V fwd(V z) const { return at::vec::clamp(z, zero, six); }
  V grad(V g, V a) const { return g & (a > zero) & (a < six); }  // 0 < a < 6 iff 0 < z < 6
};
struct LeakyRelu {  // from a when the slope is >= 0 (a > 0 iff z > 0), else from z: the same formula
  V slope;
  V fwd(V z) const { return V::blendv(z * slope, z, z > zero); }
  V grad(V g, V t) const { return V::blendv(g * slope, g, t > zero); }
};
// ELU, CELU and SELU as aten::elu's (negcoef = alpha * scale, poscoef = scale, negiptcoef =
// input_scale): ELU(alpha) (alpha, 1, 1), CELU(alpha) (alpha, 1, 1/alpha), SELU (its constants, 1);
// the derivative from z when the act argument says so (the table's choice, bnff.activations), else
// from a (aten's is_result form).
struct Elu {
  V neg, pos, ipt;
  bool at_z;
  V fwd(V z) const { return V::blendv((z * ipt).expm1() * neg, z * pos, z > zero); }
  V grad(V g, V t) const {
    return V::blendv(at_z ? g * ipt * neg * (t * ipt).exp() : g * ipt * (t + neg), g * pos, t > zero);
  }
};
struct Silu {
  bool fast;  // exp_u20 (BNFF_ACT_FAST_EXP: bfloat16 maps) or SLEEF's expf, as eager's silu
  V exp(V x) const { return fast ? x.exp_u20() : x.exp(); }
  V fwd(V z) const { return z / (one + exp(z.neg())); }
  V grad(V g, V z) const {
    const V s = one / (one + exp(z.neg()));
    return g * s * (one + z * (one - s));
  }
};
struct Hardswish {  // f' on the open interval (-3, 3), 0 below, 1 above, as hardswish_backward
  V fwd(V z) const { return z * at::vec::minimum(at::vec::maximum(z + three, zero), six) / six; }
  V grad(V g, V z) const { return V::blendv(V::blendv(g, g * (z / three + half), z < three), zero, z <= V(-3.f)); }
};
struct Hardsigmoid {
  V fwd(V z) const { return at::vec::minimum(at::vec::maximum(z + three, zero), six) / six; }
  V grad(V g, V z) const { return (g * V(1.f / 6.f)) & (z > V(-3.f)) & (z < three); }
};
struct Sigmoid {
  V fwd(V z) const { return one / (one + z.neg().exp()); }
  V grad(V g, V a) const { return g * (one - a) * a; }
};
struct Tanh {
  V fwd(V z) const { return z.tanh(); }
  V grad(V g, V a) const { return g * (one - a * a); }
};
struct Gelu {
  V fwd(V z) const { return z * half * (one + (z * V(float(M_SQRT1_2))).erf()); }
  V grad(V g, V z) const {
    const V cdf = half * (one + (z * V(float(M_SQRT1_2))).erf());
    const V pdf = V(float(M_2_SQRTPI * M_SQRT1_2 * 0.5)) * (z * z * V(-0.5f)).exp();
    return g * (cdf + z * pdf);
  }
};
struct GeluTanh {
  static V beta() { return V(float(M_SQRT2 * M_2_SQRTPI * 0.5)); }
  V fwd(V z) const { return half * z * (one + (beta() * (z + V(0.044715f) * (z * z * z))).tanh()); }
  V grad(V g, V z) const {
    const V kappa(0.044715f), sq = z * z;
    const V th = (beta() * (z + kappa * (sq * z))).tanh();
    return g * (half * (one + th) + half * z * (one - th * th) * beta() * (one + three * kappa * sq));
  }
};
struct Mish {
  V fwd(V z) const { return z * z.exp().log1p().tanh(); }
  V grad(V g, V z) const {
    const V s = one / (one + z.neg().exp()), ts = z.exp().log1p().tanh();
    return g * (ts + z * s * (one - ts * ts));
  }
};

// f(the formulas of activation `act`): one switch per call, the formulas inlined in f's loops.
template <typename F>
BNFF_INLINE void dispatch(int64_t act, F&& f) {
  const float p = act_param(act);
  switch (act_code(act)) {
    case BNFF_ACT_RELU: return f(Relu{});
    case BNFF_ACT_RELU6: return f(Relu6{});
    case BNFF_ACT_LEAKY_RELU: return f(LeakyRelu{V(p)});
    case BNFF_ACT_ELU: return f(Elu{V(p), one, one, from_z(act)});
    case BNFF_ACT_CELU: return f(Elu{V(p), one, V(static_cast<float>(1.0 / static_cast<double>(p))), from_z(act)});
    case BNFF_ACT_SELU: return f(Elu{V(BNFF_SELU_ALPHA * BNFF_SELU_SCALE), V(BNFF_SELU_SCALE), one, from_z(act)});
    case BNFF_ACT_SILU: return f(Silu{(act & BNFF_ACT_FAST_EXP) != 0});
    case BNFF_ACT_HARDSWISH: return f(Hardswish{});
    case BNFF_ACT_HARDSIGMOID: return f(Hardsigmoid{});
    case BNFF_ACT_SIGMOID: return f(Sigmoid{});
    case BNFF_ACT_TANH: return f(Tanh{});
    case BNFF_ACT_GELU: return f(Gelu{});
    case BNFF_ACT_GELU_TANH: return f(GeluTanh{});
    case BNFF_ACT_MISH: return f(Mish{});
    default: return f(Identity{});
  }
}
}  // namespace act

// a = f(z), and dy = g * f'(t), of one vector for any activation: the NCHW loops, which take the
// activation at run time (one switch per vector); the channels_last loops use the *_n forms below.
__attribute__((noinline)) inline V act_forward(V z, int64_t a) {
  V out;
  act::dispatch(a, [&](auto f) { out = f.fwd(z); });
  return out;
}
__attribute__((noinline)) inline V act_grad(V g, V t, int64_t a) {
  V out;
  act::dispatch(a, [&](auto f) { out = f.grad(g, t); });
  return out;
}

// a = f(z) and dy = g * f'(t) for an activation argument: none, ReLU, ReLU6, SiLU and Hardswish inlined (the
// channels_last loops make them compile-time constants, with_act), the others through act_forward /
// act_grad.
BNFF_INLINE V activate(V z, int64_t a) {
  if (a == kNone) return z;
  if (a == kRelu) return act::Relu{}.fwd(z);
  if (a == kRelu6) return act::Relu6{}.fwd(z);
  if (a == kSilu || a == kSiluFast) return act::Silu{a == kSiluFast}.fwd(z);
  if (a == kHardswish) return act::Hardswish{}.fwd(z);
  return act_forward(z, a);
}
BNFF_INLINE V grad_of(V g, V t, int64_t a) {
  if (a == kNone) return g;
  if (a == kRelu) return act::Relu{}.grad(g, t);
  if (a == kRelu6) return act::Relu6{}.grad(g, t);
  if (a == kSilu || a == kSiluFast) return act::Silu{a == kSiluFast}.grad(g, t);
  if (a == kHardswish) return act::Hardswish{}.grad(g, t);
  return act_grad(g, t, a);
}
// The activation argument a kernel over maps of element type TX runs: SiLU's fast exponential on
// bfloat16 maps (BNFF_ACT_FAST_EXP), the argument as given otherwise.
template <typename TX>
constexpr int64_t act_for(int64_t act) {
  return std::is_same_v<TX, at::BFloat16> && act == kSilu ? kSiluFast : act;
}
// dy of a lone BN term from its input x: the derivative at the recomputed z, or from the recomputed
// a (rounded to the stored bfloat16 when the applied map is bfloat16: 5.99f stored as bfloat16 is 6,
// outside ReLU6's open interval).
BNFF_INLINE V lone_dy(V g, V x, V mu, V f1, V beta, int64_t act, bool round) {
  if (act == kNone) return g;
  const V z = term(x, mu, f1, beta);
  if (from_z(act)) return grad_of(g, z, act);
  V a = activate(z, act);
  if (round) a = round_bf16(a);
  return grad_of(g, a, act);
}
// dx = F1 dy + B (x - mu) - F1 S1 (seed 002 eq. 17-20); F1 dy alone without mini-batch statistics
// (B absent).
struct DxVec {
  V f1, b, mu, k0;  // k0 = F1 S1
  bool has_b;
};
BNFF_INLINE V dx_of(V d, V x, const DxVec& v) { return v.has_b ? v.f1 * d + v.b * (x - v.mu) - v.k0 : v.f1 * d; }

// Per-channel constants as vectors: n channels from c0 (channels_last), or channel c broadcast (NCHW).
BNFF_INLINE V per_lane(const float* p, int64_t c0, int64_t n) { return ld(p + c0, n); }
BNFF_INLINE V per_plane(const float* p, int64_t c) { return V(p[c]); }
template <typename Get>
BNFF_INLINE DxVec dx_vec(Get get, const float* f1, const float* b, const float* mu, const float* k0) {
  return DxVec{get(f1), b ? get(b) : V(0.f), get(mu), b ? get(k0) : V(0.f), b != nullptr};
}

// ---- kernel entries, counted per sweep, layout and element type ---------------------------------
// Tests read them (bnff::kernel_calls) to prove that a sweep ran here and not in the reference.
// (pointwise, pointwise_backward: the fused pointwise convolution of bnff_pointwise.cpp.)
enum Sweep { kChannelStats, kApply, kGradStats, kInputGrad, kGradStatsX, kInputGradX, kPointwise, kPointwiseBwd, kSweeps };
const char* const kSweepNames[kSweeps] = {"channel_stats", "apply", "grad_stats", "input_grad", "grad_stats_x",
                                          "input_grad_x", "pointwise", "pointwise_backward"};
inline std::array<std::atomic<int64_t>, kSweeps * 4> g_calls{};

// The call of sweep s in layout cl on feature maps of t's element type.
inline void count(Sweep s, bool cl, const Tensor& t) {
  g_calls[s * 4 + (cl ? 2 : 0) + (t.scalar_type() == at::kBFloat16 ? 1 : 0)].fetch_add(1, std::memory_order_relaxed);
}

// ("sweep/layout/dtype", calls) for every combination, layout "nhwc" (channels_last) or "nchw".
inline std::tuple<std::vector<std::string>, std::vector<int64_t>> kernel_calls() {
  std::vector<std::string> keys;
  std::vector<int64_t> calls;
  for (int s = 0; s < kSweeps; ++s)
    for (int i = 0; i < 4; ++i) {
      keys.push_back(std::string(kSweepNames[s]) + (i & 2 ? "/nhwc" : "/nchw") + (i & 1 ? "/bfloat16" : "/float32"));
      calls.push_back(g_calls[s * 4 + i].load(std::memory_order_relaxed));
    }
  return {keys, calls};
}

// A (N, C, H, W) tensor as rows x channels (channels_last) or planes (NCHW).
struct Geo {
  bool cl;        // channels_last
  int64_t n, c, hw;
  int64_t m() const { return n * hw; }  // values per channel
};

inline Geo geo_of(const Tensor& t, int64_t layout) {
  TORCH_CHECK(t.dim() == 4, "bnff cpu backend: expected a 4-D tensor, got ", t.dim(), "-D");
  const bool cl = layout == BNFF_LAYOUT_NHWC;
  TORCH_CHECK(t.is_contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous),
              "bnff cpu backend: a tensor is not dense in the layout the caller gave (", cl ? "channels_last" : "NCHW", ")");
  return Geo{cl, t.size(0), t.size(1), t.size(2) * t.size(3)};
}

// A source map of a term: its data, its channel count and its offset in the term's channels.
struct Src {
  const void* p;
  int64_t c, off;
  template <typename T>
  const T* at() const { return static_cast<const T*>(p); }
  // NCHW: where plane (n, channel ch of the term) starts in this source map, in elements.
  int64_t plane(int64_t n, int64_t ch, int64_t hw) const { return (n * c + (ch - off)) * hw; }
};

inline std::vector<std::vector<Src>> terms_of(at::TensorList sources, at::IntArrayRef n_sources) {
  std::vector<std::vector<Src>> terms;
  size_t i = 0;
  for (int64_t k : n_sources) {
    std::vector<Src> t;
    int64_t off = 0;
    for (int64_t j = 0; j < k; ++j, ++i) {
      const Tensor& s = sources[i];
      t.push_back(Src{s.data_ptr(), s.size(1), off});
      off += s.size(1);
    }
    terms.push_back(std::move(t));
  }
  return terms;
}

// The source of a term holding channel c.
BNFF_INLINE const Src& source_of(const std::vector<Src>& t, int64_t c) {
  size_t j = 0;
  while (c >= t[j].off + t[j].c) ++j;
  return t[j];
}

// NCHW: plane (n, c) of every term, each read from its source holding channel c.
template <typename TX>
BNFF_INLINE void term_planes(const std::vector<std::vector<Src>>& terms, int64_t n, int64_t c, int64_t hw,
                             const TX** xp) {
  for (size_t k = 0; k < terms.size(); ++k) {
    const Src& s = source_of(terms[k], c);
    xp[k] = s.at<TX>() + s.plane(n, c, hw);
  }
}

inline int64_t n_chunks(int64_t rows) {
  int64_t want = std::max<int64_t>(1, rows / 64);
  return std::min<int64_t>(want, 8 * at::get_num_threads());
}

// Channels [c0, c0 + n), n <= W, cut at every source boundary so that each lies in one source map
// of every term; src[k] is that source's index in term k (a channels_last row loop visits them).
struct Seg {
  int64_t c0, n;
  std::vector<int> src;
};

inline std::vector<Seg> segments(int64_t C, const std::vector<std::vector<Src>>& terms) {
  std::vector<int64_t> cuts{0, C};
  for (const auto& t : terms)
    for (const Src& s : t) cuts.push_back(s.off);
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  std::vector<Seg> segs;
  for (size_t i = 0; i + 1 < cuts.size(); ++i) {
    for (int64_t c0 = cuts[i]; c0 < cuts[i + 1]; c0 += W) {
      Seg sg{c0, std::min(W, cuts[i + 1] - c0), {}};
      for (const auto& t : terms) {
        int j = 0;
        while (c0 >= t[j].off + t[j].c) ++j;
        sg.src.push_back(j);
      }
      segs.push_back(std::move(sg));
    }
  }
  return segs;
}

// f(n) with n a compile-time W for a full segment (its loads and stores then carry no tail test).
template <typename F>
BNFF_INLINE void with_width(int64_t n, F&& f) {
  if (n == W) f(std::integral_constant<int64_t, W>{});
  else f(n);
}

// Whether the loops compute activation argument `act` inline in register tiles (none, ReLU, ReLU6); the
// others run through act_forward / act_grad (NCHW) or row by row (channels_last).
constexpr bool inline_act(int64_t act) { return act == kNone || act == kRelu || act == kRelu6; }
// f(act) with no activation, ReLU, ReLU6 and (with Runtime) SiLU and Hardswish compile-time constants (no test per
// vector in the row loops), SiLU as act_for<TX> gives it for maps of element type TX (one instantiation
// per TX); any other activation at run time (the loops then take rows through the *_n forms), or, with
// Runtime false (callers that take only inline_act activations), as none.
template <bool Runtime = true, typename TX = float, typename F>
BNFF_INLINE void with_act(int64_t act, F&& f) {
  constexpr int64_t silu = act_for<TX>(kSilu);
  if (act == kRelu) f(std::integral_constant<int64_t, kRelu>{});
  else if (act == kRelu6) f(std::integral_constant<int64_t, kRelu6>{});
  else if constexpr (Runtime) {
    if (act == kNone) f(std::integral_constant<int64_t, kNone>{});
    else if (act == silu) f(std::integral_constant<int64_t, silu>{});
    else if (act == kHardswish) f(std::integral_constant<int64_t, kHardswish>{});
    else f(act);
  } else f(std::integral_constant<int64_t, kNone>{});
}
// Whether with_act gave a run-time activation: its loops then take their counts at run time too
// (one instantiation for all the activations of act_forward, which keeps the build short).
template <typename A>
constexpr bool runtime_act = std::is_same_v<std::decay_t<A>, int64_t>;

// f(b) with a flag b a compile-time constant.
template <typename F>
BNFF_INLINE void with_flag(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

// with_flag for the constant activations, b at run time for a run-time one.
template <typename A, typename F>
BNFF_INLINE void with_flag_for(A, bool b, F&& f) {
  if constexpr (runtime_act<A>) f(b);
  else with_flag(b, f);
}

// f(k) with a count of BN terms of 1 or 2 (nearly every call) a compile-time constant; any other
// count at run time.
template <typename F>
BNFF_INLINE void with_count(int64_t k, F&& f) {
  if (k == 1) f(std::integral_constant<int64_t, 1>{});
  else if (k == 2) f(std::integral_constant<int64_t, 2>{});
  else f(k);
}
// with_count for the constant activations, k at run time for a run-time one.
template <typename A, typename F>
BNFF_INLINE void with_count_for(A, int64_t k, F&& f) {
  if constexpr (runtime_act<A>) f(k);
  else with_count(k, f);
}

// f(k, r) with the (BN terms, shortcuts) of the fusion patterns' groups as compile-time constants:
// (1, 0) a lone BN, (1, 1) a BN plus an identity shortcut, (2, 0) a BN plus a projection shortcut's
// BN; any other pair at run time. Fewer instantiations keep the build short.
template <typename F>
BNFF_INLINE void with_terms(int64_t k, int64_t r, F&& f) {
  using I0 = std::integral_constant<int64_t, 0>;
  using I1 = std::integral_constant<int64_t, 1>;
  using I2 = std::integral_constant<int64_t, 2>;
  if (k == 1 && r == 0) f(I1{}, I0{});
  else if (k == 1 && r == 1) f(I1{}, I1{});
  else if (k == 2 && r == 0) f(I2{}, I0{});
  else f(k, r);
}
// with_terms for the constant activations, (k, r) at run time for a run-time one.
template <typename A, typename F>
BNFF_INLINE void with_terms_for(A, int64_t k, int64_t r, F&& f) {
  if constexpr (runtime_act<A>) f(k, r);
  else with_terms(k, r, f);
}

// out[i] += sum over chunks of part[ch * width + i]: the per-chunk partial sums of a reduction.
inline void add_chunks(const std::vector<double>& part, int64_t nc, int64_t width, double* out) {
  for (int64_t ch = 0; ch < nc; ++ch)
    for (int64_t i = 0; i < width; ++i) out[i] += part[ch * width + i];
}

// Rows [r0, r1) of chunk ch of a sweep over channels_last rows, in blocks of kBlock rows: body
// (chunk, first row, row count) once per block. A reduction's per-block work in double (adding a
// block's float sums into the chunk's) is spread over 256 rows; channel_stats walks each tile down
// the block twice, the second time from cache. The other sweeps run row by row over all segments
// (sequential streams; their per-segment float sums are the block's), grad_stats and grad_stats_x
// in tiles where walk_tiles says so. Measured with benchmarks/sweep_bandwidth.py on Zen 4: 32-row blocks, and
// segment-by-segment walks for the sweeps that read each element once, reached about half the GB/s.
// An NCHW sweep walks each plane in runs of kRun values (kBlock per lane), its float sums the run's.
constexpr int64_t kBlock = 256;
constexpr int64_t kRun = kBlock * W;
constexpr int64_t kMaxTerms = BNFF_MAX_TERMS;  // BN terms, or shortcuts, of one call on the vector path

// Tiles: the reductions channel_stats, grad_stats and grad_stats_x walk a few vectors of channels
// side by side down a block of rows, their sums and per-channel constants in registers (kTile at 3
// registers per vector, kTileBwd at up to 5; 32 registers at AVX-512, 16 at AVX2). Where a tile is
// narrower than a row, that walk reads each row in pieces, out of memory order: on Zen 4 it cost
// 10-20% on maps streamed from memory with row strides of 1 kB or more and gained 1.2-2.6x on maps
// that stay in the last-level cache (measured in one process, interleaved, before this rule). So a
// tile narrower than the row walks only maps whose bytes read and written total at most
// kResidentBytes (half of Zen 4's 32 MB L3: an estimate, which costs speed, never results, where it
// is wrong); the others keep the row-by-row walk. benchmarks/kernel_ab.py measures the effect. The
// element-wise sweeps (apply, dx), which keep nothing in registers across rows, lost in tiles
// (0.72-1.04x) and walk row by row.
constexpr int64_t kTile = W == 16 ? 8 : 4;
constexpr int64_t kTileBwd = W == 16 ? 4 : 2;
constexpr int64_t kResidentBytes = int64_t(16) << 20;
BNFF_INLINE bool walk_tiles(int64_t C, int64_t tile, int64_t bytes) { return C <= tile * W || bytes <= kResidentBytes; }

// Where each term reads segment i: its row-0 element and its row stride, worked out once per call so
// that the row loops do no lookups.
template <typename TX>
struct SegPtr {
  const TX* xp[kMaxTerms];
  int64_t xs[kMaxTerms];
  int64_t c0, n;
};
template <typename TX>
std::vector<SegPtr<TX>> seg_ptrs(const std::vector<Seg>& segs, const std::vector<std::vector<Src>>& terms) {
  std::vector<SegPtr<TX>> sp(segs.size());
  for (size_t i = 0; i < segs.size(); ++i) {
    sp[i].c0 = segs[i].c0;
    sp[i].n = segs[i].n;
    for (size_t k = 0; k < terms.size(); ++k) {
      const Src& s = terms[k][segs[i].src[k]];
      sp[i].xp[k] = s.at<TX>() + (segs[i].c0 - s.off);
      sp[i].xs[k] = s.c;
    }
  }
  return sp;
}
template <typename F>
inline void row_blocks(int64_t rows, int64_t nc, F&& body) {
  at::parallel_for(0, nc, 1, [&](int64_t b, int64_t e) {
    for (int64_t ch = b; ch < e; ++ch) {
      const int64_t r0 = ch * rows / nc, r1 = (ch + 1) * rows / nc;
      for (int64_t rb = r0; rb < r1; rb += kBlock) body(ch, rb, std::min(r1, rb + kBlock) - rb);
    }
  });
}

// Every (image, channel) plane of an NCHW sweep, split over threads: body(n, c).
template <typename F>
inline void planes(const Geo& g, int64_t C, F&& body) {
  at::parallel_for(0, g.n * C, 1, [&](int64_t b, int64_t e) {
    for (int64_t pl = b; pl < e; ++pl) body(pl / C, pl % C);
  });
}

// f(i, n) for the vectors [i, i + n) of [i0, i1), n = W except at the tail.
template <typename F>
BNFF_INLINE void vectors(int64_t i0, int64_t i1, F&& f) {
  int64_t i = i0;
  for (; i + W <= i1; i += W) f(i, std::integral_constant<int64_t, W>{});
  if (i < i1) f(i, i1 - i);
}

// ---- the activations over a row of values ---------------------------------------------------------
// The channels_last loops of an activation other than none, ReLU and ReLU6 form a row of z (or of t
// and g) in a float buffer, then run one of these over it: the switch once per row, the formulas
// inlined in a tight loop (one instantiation for every activation, which keeps the build short).
// z[0, n) = f(z) in place.
__attribute__((noinline)) inline void act_forward_n(float* z, int64_t n, int64_t a) {
  act::dispatch(a, [&](auto f) { vectors(0, n, [&](int64_t i, auto w) BNFF_LAMBDA { st(z + i, f.fwd(ld(z + i, w)), w); }); });
}
// g[0, n) = g * f'(t) in place.
__attribute__((noinline)) inline void act_grad_n(float* g, const float* t, int64_t n, int64_t a) {
  act::dispatch(a, [&](auto f) {
    vectors(0, n, [&](int64_t i, auto w) BNFF_LAMBDA { st(g + i, f.grad(ld(g + i, w), ld(t + i, w)), w); });
  });
}
// g[0, n) = g * f'(.) from z[0, n): at z, or at a = f(z) (rounded to bfloat16 where `round`: the value
// the forward stored) as the act argument says; z is overwritten.
__attribute__((noinline)) inline void lone_grad_n(float* g, float* z, int64_t n, int64_t a, bool round) {
  act::dispatch(a, [&](auto f) {
    vectors(0, n, [&](int64_t i, auto w) BNFF_LAMBDA {
      V t = ld(z + i, w);
      if (!from_z(a)) {
        t = f.fwd(t);
        if (round) t = round_bf16(t);
      }
      st(g + i, f.grad(ld(g + i, w), t), w);
    });
  });
}

// ---- apply --------------------------------------------------------------------------------------
// Per-term (C,) float vectors: mean, F1, beta (zeros without affine).
struct TermVec {
  const float *mu, *f1, *beta;
};

inline std::vector<TermVec> vecs_of(at::TensorList means, at::TensorList f1s, at::TensorList betas) {
  std::vector<TermVec> v;
  for (size_t k = 0; k < means.size(); ++k)
    v.push_back(TermVec{means[k].data_ptr<float>(), f1s[k].data_ptr<float>(), betas[k].data_ptr<float>()});
  return v;
}

// z = sum_k term(x_k) + sum_j r_j: the pre-activation on one vector, as apply forms it and grad_stats
// recomputes it (the same operations in the same order: the same bits). xs/rs give term k's and
// shortcut j's vector, get(p) a per-channel constant's.
template <typename X, typename R, typename Get>
BNFF_INLINE V preact(int64_t K, int64_t Rn, const TermVec* vec, X xs, R rs, Get get) {
  V z(0.f);
  for (int64_t k = 0; k < K; ++k) z += term(xs(k), get(vec[k].mu), get(vec[k].f1), get(vec[k].beta));
  for (int64_t j = 0; j < Rn; ++j) z += rs(j);
  return z;
}
// The apply step on one vector: act(z).
template <typename X, typename R, typename Get>
BNFF_INLINE V applied(int64_t K, int64_t Rn, const TermVec* vec, X xs, R rs, Get get, int64_t act) {
  return activate(preact(K, Rn, vec, xs, rs, get), act);
}

// The apply step on channels_last row r of the inputs (row stride C of the shortcuts, each term's own
// segments sp): dst[0, C) = act(z), for the constant counts and activation the callers' with_terms_for
// and with_act give. A run-time activation forms z in buf (C floats) first, then act_forward_n over
// it. The same operations as every kernel that recomputes a, so the same bits (the apply sweep writes
// the map's rows with it, the fused pointwise convolution a block of rows in cache).
template <typename KK, typename RR, typename A, typename TX, typename TO>
BNFF_INLINE void apply_row(KK K, RR R, A act, const std::vector<SegPtr<TX>>& sp, const TermVec* vec,
                           const TX* const* rp, int64_t C, int64_t r, TO* dst, float* buf) {
  constexpr bool rows_of_z = runtime_act<A>;
  for (const auto& q : sp) {
    with_width(q.n, [&](auto w) BNFF_LAMBDA {
      const V z = preact(
          K, R, vec, [&](int64_t k) BNFF_LAMBDA { return ld(q.xp[k] + r * q.xs[k], w); },
          [&](int64_t j) BNFF_LAMBDA { return ld(rp[j] + r * C + q.c0, w); },
          [&](const float* p) BNFF_LAMBDA { return per_lane(p, q.c0, w); });
      if constexpr (rows_of_z) st(buf + q.c0, z, w);
      else st(dst + q.c0, activate(z, act), w);
    });
  }
  if constexpr (rows_of_z) {
    act_forward_n(buf, C, act);
    vectors(0, C, [&](int64_t i, auto w) BNFF_LAMBDA { st(dst + i, ld(buf + i, w), w); });
  }
}

// C per-channel sums divided by m, as a float (C,) tensor.
inline Tensor per_channel(const double* sums, const Geo& g, const Tensor& like) {
  Tensor t = at::empty({g.c}, like.options().dtype(at::kFloat));
  for (int64_t c = 0; c < g.c; ++c) t.data_ptr<float>()[c] = static_cast<float>(sums[c] / g.m());
  return t;
}

// k0 = F1 S1 per channel, (C,) float (ATen's float product, one rounding).
inline Tensor k0_of(const Tensor& f1, const Tensor& s1) {
  Tensor k0 = at::empty({f1.numel()}, f1.options().dtype(at::kFloat));
  const float *f = f1.data_ptr<float>(), *s = s1.data_ptr<float>();
  for (int64_t c = 0; c < f1.numel(); ++c) k0.data_ptr<float>()[c] = f[c] * s[c];
  return k0;
}

// ---- the backward sweeps (bnff_backward.cpp, bnff_lone.cpp), registered by bnff_cpu.cpp -----------
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> grad_stats(
    const Tensor& grad, const std::optional<Tensor>& a, int64_t act, at::TensorList sources,
    at::IntArrayRef n_sources, at::TensorList means, at::TensorList f1s, at::TensorList betas,
    at::TensorList residuals, int64_t layout);
std::vector<Tensor> input_grad(const Tensor& dy, at::TensorList sources, const Tensor& mean, const Tensor& f1,
                               const std::optional<Tensor>& b, const Tensor& s1, int64_t layout);
std::tuple<Tensor, Tensor> grad_stats_x(const Tensor& grad, at::TensorList sources, const Tensor& mean,
                                        const Tensor& f1, const Tensor& beta, int64_t act, at::ScalarType out_dtype,
                                        int64_t layout);
std::vector<Tensor> input_grad_x(const Tensor& grad, at::TensorList sources, const Tensor& mean, const Tensor& f1,
                                 const Tensor& beta, int64_t act, at::ScalarType out_dtype,
                                 const std::optional<Tensor>& b, const Tensor& s1, int64_t layout);


// One lone BN term's backward constants (C,), offset by each source's .off (bnff_lone.cpp).
struct TermBwd {
  const float *mu, *f1, *beta, *b, *k0;
  int64_t act;
  bool round_bf16;
};
// grad_stats_x's sums over channels_last rows [rb, rb + nb) of g (element type gt, C channels per row)
// and of the term's sources (element type xt), added to q1, q2 (C doubles each): what grad_stats_x
// adds for those rows, for a caller that has them in cache (the fused pointwise backward).
void lone_block_stats(const std::vector<Src>& srcs, const TermBwd& t, at::ScalarType xt, const void* g,
                      at::ScalarType gt, int64_t C, int64_t rb, int64_t nb, double* q1, double* q2);

// ---- the fused pointwise convolution (bnff_pointwise.cpp), registered by bnff_cpu.cpp ---------------
std::string pointwise_target(std::string target);
bool pointwise_has(at::ScalarType dtype);
std::tuple<Tensor, Tensor, Tensor> pointwise_forward(at::TensorList sources, at::IntArrayRef n_sources,
                                                     at::TensorList means, at::TensorList f1s, at::TensorList betas,
                                                     at::TensorList residuals, int64_t act, const Tensor& weight,
                                                     int64_t stride, bool stats, int64_t block_rows, int64_t layout);
std::tuple<Tensor, Tensor, Tensor, Tensor> pointwise_backward(at::TensorList sources,
                                                              const std::optional<Tensor>& mean,
                                                              const std::optional<Tensor>& f1,
                                                              const std::optional<Tensor>& beta, int64_t act,
                                                              const Tensor& dy, const Tensor& weight, bool wgrad,
                                                              int64_t block_rows, int64_t layout);

}  // namespace bnff_cpu
