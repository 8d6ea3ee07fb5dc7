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
// (planes of H*W). The Python side decides which (its rule is the only one), passes it as `layout`
// and falls back to the reference for anything else; here it is only checked.
// Constants shared with Python (activation codes, layout codes, the most BN terms or shortcuts of a
// call) are defined there (bnff/ops/backends/cpu.py) and passed as -D flags at build time.
// Element types: float32 or bfloat16 (one type for a call's feature maps, another for its gradient),
// accumulated in float32 within blocks of rows and in double across blocks.
// channels_last loops run on 16-channel vectors (GCC vector extensions: one AVX-512 register when built
// for that level, two AVX2 registers at the AVX2 level; cpu.py builds one cache per level),
// one 16-channel segment at a time down a block of rows, with the activation, the vector width
// and the number of terms made compile-time constants; NCHW loops are scalar with omp simd.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <string>
#include <type_traits>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
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


// ---- 16-lane float vectors (channels_last hot loops) ---------------------------------------------
// GCC vector extensions: 512-bit registers when built for AVX-512 (x86-64-v4), split by the compiler
// elsewhere. A vector holds 16 consecutive channels of one row; n < 16 loads/stores a tail.
constexpr int64_t W = 16;
typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

#define BNFF_INLINE inline __attribute__((always_inline))
// full vectors are fixed-size copies (single vector moves); a tail copies n < 16 lanes.
BNFF_INLINE vf ld(const float* p, int64_t n) {
  vf v = {};
  if (n == W) std::memcpy(&v, p, sizeof v);
  else std::memcpy(&v, p, n * sizeof(float));
  return v;
}
BNFF_INLINE vf ld(const at::BFloat16* p, int64_t n) {
  vh h = {};
  if (n == W) std::memcpy(&h, p, sizeof h);
  else std::memcpy(&h, p, n * sizeof(uint16_t));
  vu u = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
BNFF_INLINE void st(float* p, vf v, int64_t n) {
  if (n == W) std::memcpy(p, &v, sizeof v);
  else std::memcpy(p, &v, n * sizeof(float));
}
// float -> bfloat16 per lane, rounded to nearest even. With AVX512_BF16 (the "avx512_bf16" build
// level) one VCVTNEPS2BF16, which treats float32 subnormals (|v| < 2^-126) as zero; elsewhere
// bf16_bits vectorized (subnormals kept, NaN made the quiet 0x7FC0). The apply step is 1.3x faster
// with the instruction on Zen 4. Every kernel of a build rounds through here, so a recomputed
// activation and its mask match the stored one bit for bit.
#ifdef __AVX512BF16__
BNFF_INLINE vh to_bf16(vf v) {
  const __m256bh b = _mm512_cvtneps_pbh(reinterpret_cast<__m512>(v));
  vh h;
  std::memcpy(&h, &b, sizeof h);
  return h;
}
#else
BNFF_INLINE vh to_bf16(vf v) {
  vu u;
  std::memcpy(&u, &v, sizeof u);
  vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return __builtin_convertvector((u & 0x7FFFFFFFu) > 0x7F800000u ? (vu){} + 0x7FC0u : r, vh);
}
#endif
BNFF_INLINE void st(at::BFloat16* p, vf v, int64_t n) {
  vh h = to_bf16(v);
  if (n == W) std::memcpy(p, &h, sizeof h);
  else std::memcpy(p, &h, n * sizeof(uint16_t));
}
// v rounded to bfloat16 and back (the stored value's precision).
BNFF_INLINE vf round_bf16(vf v) {
  vu u = __builtin_convertvector(to_bf16(v), vu) << 16;
  vf r;
  std::memcpy(&r, &u, sizeof r);
  return r;
}
BNFF_INLINE vf splat(float s) { return (vf){} + s; }
inline float lane(vf v, int64_t i) { return v[i]; }

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
Tensor workspace_empty(at::IntArrayRef sizes, const at::TensorOptions& opts, bool channels_last) {
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

#if !defined(BNFF_ACT_NONE) || !defined(BNFF_ACT_RELU) || !defined(BNFF_ACT_RELU6) || !defined(BNFF_MAX_TERMS) || \
    !defined(BNFF_LAYOUT_NHWC)
#error "bnff_cpu.cpp is built by bnff.ops.backends.cpu, which passes the constants it shares with Python"
#endif
enum Act : int64_t { kNone = BNFF_ACT_NONE, kRelu = BNFF_ACT_RELU, kRelu6 = BNFF_ACT_RELU6 };

// ---- kernel entries, counted per sweep, layout and element type ---------------------------------
// Tests read them (bnff::kernel_calls) to prove that a sweep ran here and not in the reference.
enum Sweep { kChannelStats, kApply, kGradStats, kInputGrad, kGradStatsX, kInputGradX, kSweeps };
const char* const kSweepNames[kSweeps] = {"channel_stats", "apply", "grad_stats", "input_grad", "grad_stats_x",
                                          "input_grad_x"};
std::array<std::atomic<int64_t>, kSweeps * 4> g_calls{};

// The call of sweep s in layout cl on feature maps of t's element type.
void count(Sweep s, bool cl, const Tensor& t) {
  g_calls[s * 4 + (cl ? 2 : 0) + (t.scalar_type() == at::kBFloat16 ? 1 : 0)].fetch_add(1, std::memory_order_relaxed);
}

// ("sweep/layout/dtype", calls) for every combination, layout "nhwc" (channels_last) or "nchw".
std::tuple<std::vector<std::string>, std::vector<int64_t>> kernel_calls() {
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

Geo geo_of(const Tensor& t, int64_t layout) {
  TORCH_CHECK(t.dim() == 4, "bnff cpu backend: expected a 4-D tensor, got ", t.dim(), "-D");
  const bool cl = layout == BNFF_LAYOUT_NHWC;
  TORCH_CHECK(t.is_contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous),
              "bnff cpu backend: a tensor is not dense in the layout the caller gave (", cl ? "channels_last" : "NCHW", ")");
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

// Call f with a null pointer of the feature maps' element type (float or BFloat16), for kernels
// templated on it: every feature map of a call has one dtype (the Python side makes it so).
template <typename F>
void feature_typed(bool bf16, F&& f) {
  if (bf16) f(static_cast<const at::BFloat16*>(nullptr));
  else f(static_cast<const float*>(nullptr));
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

// The same two on 16 channels. NaN: relu gives 0 (as activate_row), the mask of a NaN is 0.
BNFF_INLINE vf activate(vf z, int64_t act) {
  if (act == kRelu) return z > 0.f ? z : (vf){};
  if (act == kRelu6) {
    z = z < 0.f ? (vf){} : z;
    return z > 6.f ? splat(6.f) : z;
  }
  return z;
}
BNFF_INLINE vf masked(vf g, vf a, int64_t act) {
  if (act == kRelu) return a > 0.f ? g : (vf){};
  if (act == kRelu6) return (a > 0.f) & (a < 6.f) ? g : (vf){};
  return g;
}

// Channels [c0, c0 + n), n <= W, cut at every source boundary so that each lies in one source map
// of every term; src[k] is that source's index in term k (a channels_last row loop visits them).
struct Seg {
  int64_t c0, n;
  std::vector<int> src;
};

std::vector<Seg> segments(int64_t C, const std::vector<std::vector<Src>>& terms) {
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

// f(n) with n a compile-time 16 for a full segment (its loads and stores then carry no tail test).
template <typename F>
BNFF_INLINE void with_width(int64_t n, F&& f) {
  if (n == W) f(std::integral_constant<int64_t, W>{});
  else f(n);
}

// f(act) with the activation a compile-time constant (no test per vector in the row loops).
template <typename F>
BNFF_INLINE void with_act(int64_t act, F&& f) {
  if (act == kRelu) f(std::integral_constant<int64_t, kRelu>{});
  else if (act == kRelu6) f(std::integral_constant<int64_t, kRelu6>{});
  else f(std::integral_constant<int64_t, kNone>{});
}

// f(b) with a flag b a compile-time constant.
template <typename F>
BNFF_INLINE void with_flag(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

// f(k) with a count of 0, 1 or 2 (BN terms, shortcuts: nearly every call) a compile-time constant.
template <typename F>
BNFF_INLINE void with_count(int64_t k, F&& f) {
  if (k == 0) f(std::integral_constant<int64_t, 0>{});
  else if (k == 1) f(std::integral_constant<int64_t, 1>{});
  else if (k == 2) f(std::integral_constant<int64_t, 2>{});
  else f(k);
}

// out[i] += sum over chunks of part[ch * width + i]: the per-chunk partial sums of a reduction.
void add_chunks(const std::vector<double>& part, int64_t nc, int64_t width, double* out) {
  for (int64_t ch = 0; ch < nc; ++ch)
    for (int64_t i = 0; i < width; ++i) out[i] += part[ch * width + i];
}

// Rows [r0, r1) of chunk ch of a sweep over channels_last rows, in blocks of kBlock rows: body
// (chunk, first row, row count) once per block. A reduction's per-block work in double (adding a
// block's float sums into the chunk's) is spread over 256 rows; channel_stats walks each 16-channel
// segment down the block twice, and that column of the block (8 or 16 kB) stays in L1 meanwhile.
// The other sweeps run row by row over all segments (sequential streams; their per-segment float
// sums are the block's). Measured with benchmarks/sweep_bandwidth.py on Zen 4: 32-row blocks, and
// segment-by-segment walks for the sweeps that read each element once, reached about half the GB/s.
constexpr int64_t kBlock = 256;
constexpr int64_t kMaxTerms = BNFF_MAX_TERMS;  // BN terms, or shortcuts, of one call on the vector path

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
      sp[i].xp[k] = static_cast<const TX*>(s.p) + (segs[i].c0 - s.off);
      sp[i].xs[k] = s.c;
    }
  }
  return sp;
}
template <typename F>
void row_blocks(int64_t rows, int64_t nc, F&& body) {
  at::parallel_for(0, nc, 1, [&](int64_t b, int64_t e) {
    for (int64_t ch = b; ch < e; ++ch) {
      const int64_t r0 = ch * rows / nc, r1 = (ch + 1) * rows / nc;
      for (int64_t rb = r0; rb < r1; rb += kBlock) body(ch, rb, std::min(r1, rb + kBlock) - rb);
    }
  });
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

template <typename T>
void stats_cl(const T* x, const Geo& g, double* mean, double* var) {
  // Per block of rows (in L1) and 16 channels: the block's float32 mean, then the sums of
  // d = x - mean_b and d^2 (centered: nothing cancels; sum d corrects mean_b's rounding). Within a
  // chunk, blocks add up in double around the chunk's first block mean (K): S = sum nb (mean_b - K),
  // Q = sum M2_b + nb (mean_b - K)^2; chunks merge with Chan's formula.
  const int64_t C = g.c, rows = g.m(), nc = n_chunks(rows);
  const auto segs = segments(C, {});
  std::vector<double> shift(nc * C), S(nc * C, 0.0), Q(nc * C, 0.0);
  std::vector<int64_t> count(nc, 0);
  row_blocks(rows, nc, [&](int64_t ch, int64_t rb, int64_t nb) {
    const bool first = count[ch] == 0;
    for (const Seg& sg : segs) {
      const T* p = x + rb * C + sg.c0;
      vf mb, sd = {}, m2 = {};
      with_width(sg.n, [&](auto w) {
        vf sum = {};
        for (int64_t i = 0; i < nb; ++i) sum += ld(p + i * C, w);
        mb = sum / static_cast<float>(nb);
        for (int64_t i = 0; i < nb; ++i) {
          const vf d = ld(p + i * C, w) - mb;
          sd += d;
          m2 += d * d;
        }
      });
      double* k = shift.data() + ch * C + sg.c0;
      double* s1 = S.data() + ch * C + sg.c0;
      double* q = Q.data() + ch * C + sg.c0;
      for (int64_t c = 0; c < sg.n; ++c) {
        const double sdc = lane(sd, c), mean_b = lane(mb, c) + sdc / nb;
        if (first) k[c] = mean_b;
        const double d = mean_b - k[c];
        s1[c] += nb * d;
        q[c] += std::max(0.0, lane(m2, c) - sdc * sdc / nb) + nb * d * d;
      }
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

std::tuple<Tensor, Tensor> channel_stats(const Tensor& x, int64_t layout) {
  Geo g = geo_of(x, layout);
  count(kChannelStats, g.cl, x);
  std::vector<double> md(g.c), vd(g.c);
  typed(x, [&](auto* p) {
    if (g.cl) stats_cl(p, g, md.data(), vd.data());
    else stats_nchw(p, g, md.data(), vd.data());
  });
  Tensor mean = at::empty({g.c}, x.options().dtype(at::kFloat)), var = at::empty_like(mean);
  for (int64_t c = 0; c < g.c; ++c) {
    mean.data_ptr<float>()[c] = static_cast<float>(md[c]);
    var.data_ptr<float>()[c] = static_cast<float>(vd[c]);
  }
  return {mean, var};
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

template <typename TX, typename TO>
void apply_cl(const std::vector<std::vector<Src>>& terms, const std::vector<TermVec>& vec,
              const std::vector<Src>& residuals, int64_t act, const Geo& g, TO* out) {
  const int64_t C = g.c, rows = g.m(), K = terms.size(), R = residuals.size();
  TORCH_CHECK(K <= kMaxTerms && R <= kMaxTerms, "bnff cpu apply: at most ", kMaxTerms, " BN terms and shortcuts");
  const auto sp = seg_ptrs<TX>(segments(C, terms), terms);
  const TX* rp[kMaxTerms];
  for (int64_t j = 0; j < R; ++j) rp[j] = static_cast<const TX*>(residuals[j].p);
  with_act(act, [&](auto A) {
    with_count(K, [&](auto KK) {
      with_count(R, [&](auto RR) {
        row_blocks(rows, n_chunks(rows), [&](int64_t, int64_t rb, int64_t nb) {
          for (int64_t r = rb; r < rb + nb; ++r) {
            for (const auto& q : sp) {
              with_width(q.n, [&](auto w) {
                vf z = {};
                for (int64_t k = 0; k < KK; ++k)
                  z += (ld(q.xp[k] + r * q.xs[k], w) - ld(vec[k].mu + q.c0, w)) * ld(vec[k].f1 + q.c0, w) +
                       ld(vec[k].beta + q.c0, w);
                for (int64_t j = 0; j < RR; ++j) z += ld(rp[j] + r * C + q.c0, w);
                st(out + r * C + q.c0, activate(z, A), w);
              });
            }
          }
        });
      });
    });
  });
}

template <typename TO>
void apply_kernel(const std::vector<std::vector<Src>>& terms, const std::vector<TermVec>& vec,
                  const std::vector<Src>& residuals, int64_t act, const Geo& g, TO* out) {
  const int64_t C = g.c;
  if (g.cl) {
    const bool bf16 = terms.empty() || terms[0].empty() ? residuals[0].bf16 : terms[0][0].bf16;
    feature_typed(bf16, [&](auto* tag) {
      using TX = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
      apply_cl<TX>(terms, vec, residuals, act, g, out);
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
             at::TensorList betas, at::TensorList residuals, int64_t act, at::ScalarType out_dtype, int64_t layout) {
  TORCH_CHECK(!sources.empty() || !residuals.empty(), "bnff cpu apply: nothing to apply");
  const Tensor& like = residuals.empty() ? sources[0] : residuals[0];
  Geo g0 = geo_of(like, layout);
  count(kApply, g0.cl, sources.empty() ? like : sources[0]);
  int64_t C = 0;
  for (int64_t j = 0; j < (n_sources.empty() ? 0 : n_sources[0]); ++j) C += sources[j].size(1);
  if (sources.empty()) C = like.size(1);
  Geo g{g0.cl, g0.n, C, g0.hw};
  Tensor out = workspace_empty({g.n, C, like.size(2), like.size(3)}, like.options().dtype(out_dtype), g.cl);
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
template <typename TX, typename TG>
void grad_stats_cl(const TG* gp, const TX* a, int64_t act, const std::vector<std::vector<Src>>& terms,
                   const std::vector<const float*>& mus, const Geo& g, TG* dy, std::vector<double>& s1,
                   std::vector<double>& s2) {
  const int64_t C = g.c, K = terms.size(), rows = g.m(), nc = n_chunks(rows);
  TORCH_CHECK(K <= kMaxTerms, "bnff cpu grad_stats: at most ", kMaxTerms, " BN terms");
  const auto sp = seg_ptrs<TX>(segments(C, terms), terms);
  const size_t ns = sp.size();
  std::vector<double> p1(nc * C, 0.0), p2(nc * K * C, 0.0);
  row_blocks(rows, nc, [&](int64_t ch, int64_t rb, int64_t nb) {
    std::vector<vf> acc((1 + K) * ns, vf{});  // per segment: the block's sum dy, then per term sum dy (x - mu)
    with_act(a ? act : kNone, [&](auto A) {
      with_count(K, [&](auto KK) {
        for (int64_t r = rb; r < rb + nb; ++r) {
          for (size_t i = 0; i < ns; ++i) {
            const auto& q = sp[i];
            with_width(q.n, [&](auto w) {
              const vf gv = ld(gp + r * C + q.c0, w);
              const vf d = A == kNone ? gv : masked(gv, ld(a + r * C + q.c0, w), A);
              st(dy + r * C + q.c0, d, w);
              acc[i] += d;
              for (int64_t k = 0; k < KK; ++k)
                acc[(1 + k) * ns + i] += d * (ld(q.xp[k] + r * q.xs[k], w) - ld(mus[k] + q.c0, w));
            });
          }
        }
      });
    });
    for (size_t i = 0; i < ns; ++i) {
      for (int64_t c = 0; c < sp[i].n; ++c) {
        p1[ch * C + sp[i].c0 + c] += lane(acc[i], c);
        for (int64_t k = 0; k < K; ++k) p2[(ch * K + k) * C + sp[i].c0 + c] += lane(acc[(1 + k) * ns + i], c);
      }
    }
  });
  add_chunks(p1, nc, C, s1.data());
  add_chunks(p2, nc, K * C, s2.data());
}

template <typename TG>
void grad_stats_kernel(const TG* gp, const Src* a, int64_t act, const std::vector<std::vector<Src>>& terms,
                       const std::vector<const float*>& mus, const Geo& g, TG* dy, std::vector<double>& s1,
                       std::vector<double>& s2) {
  const int64_t C = g.c, K = terms.size();
  s1.assign(C, 0.0);  // dy's channel sums are the same for every term
  s2.assign(K * C, 0.0);
  if (g.cl) {
    const bool bf16 = a ? a->bf16 : (K && !terms[0].empty() ? terms[0][0].bf16 : false);
    feature_typed(bf16, [&](auto* tag) {
      using TX = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
      grad_stats_cl(gp, a ? static_cast<const TX*>(a->p) : nullptr, act, terms, mus, g, dy, s1, s2);
    });
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
    at::IntArrayRef n_sources, at::TensorList means, int64_t layout) {
  Geo g = geo_of(grad, layout);
  count(kGradStats, g.cl, sources.empty() ? (a ? *a : grad) : sources[0]);
  Tensor dy = workspace_empty(grad.sizes(), grad.options(), g.cl);
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
// F1, B, mu, F1 S1 on 16 channels (B absent without mini-batch statistics: dx = F1 dy).
struct DxVec {
  vf f1, b, mu, k0;
  bool has_b;
  DxVec(const float* f1p, const float* bp, const float* mup, const float* k0p, int64_t n)
      : f1(ld(f1p, n)), b(bp ? ld(bp, n) : vf{}), mu(ld(mup, n)), k0(bp ? ld(k0p, n) : vf{}), has_b(bp != nullptr) {}
};
BNFF_INLINE vf dx_lanes(vf d, vf x, const DxVec& v) { return v.has_b ? v.f1 * d + v.b * (x - v.mu) - v.k0 : v.f1 * d; }

template <typename TD, typename TX>
void input_grad_kernel(const TD* dy, const TX* x, TX* dx, const Geo& g, int64_t C_total, int64_t off,
                       int64_t Cj, const float* f1, const float* b, const float* mu, const float* k0) {
  if (g.cl) {
    const int64_t rows = g.m();
    row_blocks(rows, std::min<int64_t>(rows, 8 * at::get_num_threads()), [&](int64_t, int64_t rb, int64_t nb) {
      for (int64_t r = rb; r < rb + nb; ++r) {
        for (int64_t c0 = 0; c0 < Cj; c0 += W) {
          with_width(std::min(W, Cj - c0), [&](auto w) {
            const DxVec v(f1 + c0, b ? b + c0 : nullptr, mu + c0, k0 + c0, w);
            const vf d = ld(dy + r * C_total + off + c0, w);
            st(dx + r * Cj + c0, dx_lanes(d, b ? ld(x + r * Cj + c0, w) : vf{}, v), w);
          });
        }
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
                               const std::optional<Tensor>& b, const Tensor& s1, int64_t layout) {
  Geo g = geo_of(dy, layout);
  count(kInputGrad, g.cl, sources[0]);
  Tensor k0 = (f1 * s1).contiguous();  // F1 * S1 per channel
  std::vector<Tensor> out;
  int64_t off = 0;
  for (const Tensor& x : sources) {
    const int64_t Cj = x.size(1);
    Tensor dx = workspace_empty(x.sizes(), x.options(), g.cl);
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

template <typename TX, typename TG>
void term_backward_cl(const TG* gp, const std::vector<Src>& srcs, const std::vector<void*>& dxs, const TermBwd& t,
                      const Geo& g, Mode mode, std::vector<double>& s1, std::vector<double>& s2) {
  const int64_t C = g.c, rows = g.m();
  const int64_t nc = mode == kStats ? n_chunks(rows) : std::min<int64_t>(rows, 8 * at::get_num_threads());
  const auto segs = segments(C, {srcs});
  const auto sp = seg_ptrs<TX>(segs, {srcs});
  const size_t ns = sp.size();
  std::vector<TX*> dxp(ns, nullptr);  // where segment i of dx starts (row 0), with sp[i].xs[0] as row stride
  for (size_t i = 0; mode == kDx && i < ns; ++i) {
    const Src& s = srcs[segs[i].src[0]];
    dxp[i] = static_cast<TX*>(dxs[segs[i].src[0]]) + (segs[i].c0 - s.off);
  }
  std::vector<double> p1(mode == kStats ? nc * C : 0, 0.0), p2(mode == kStats ? nc * C : 0, 0.0);
  row_blocks(rows, nc, [&](int64_t ch, int64_t rb, int64_t nb) {
    std::vector<vf> acc(mode == kStats ? 2 * ns : 0, vf{});  // per segment: the block's S1, then S2c sums
    // the activation, the mode and the rounding as compile-time constants: no tests per vector
    with_act(t.act, [&](auto A) {
      with_flag(mode == kStats, [&](auto stats) {
        with_flag(t.round_bf16, [&](auto round) {
          for (int64_t r = rb; r < rb + nb; ++r) {
            for (size_t i = 0; i < ns; ++i) {
              const auto& q = sp[i];
              const int64_t c0 = q.c0;
              with_width(q.n, [&](auto w) {
                const vf x = ld(q.xp[0] + r * q.xs[0], w), mu = ld(t.mu + c0, w);
                vf z = activate((x - mu) * ld(t.f1 + c0, w) + ld(t.beta + c0, w), A);
                if (round) z = round_bf16(z);
                const vf gv = ld(gp + r * C + c0, w);
                const vf d = A == kNone ? gv : masked(gv, z, A);
                if (stats) {
                  acc[i] += d;
                  acc[ns + i] += d * (x - mu);
                } else {
                  const DxVec v(t.f1 + c0, t.b ? t.b + c0 : nullptr, t.mu + c0, t.k0 ? t.k0 + c0 : nullptr, w);
                  st(dxp[i] + r * q.xs[0], dx_lanes(d, x, v), w);
                }
              });
            }
          }
        });
      });
    });
    for (size_t i = 0; mode == kStats && i < ns; ++i) {
      for (int64_t c = 0; c < sp[i].n; ++c) {
        p1[ch * C + sp[i].c0 + c] += lane(acc[i], c);
        p2[ch * C + sp[i].c0 + c] += lane(acc[ns + i], c);
      }
    }
  });
  if (mode == kStats) {
    s1.assign(C, 0.0);
    s2.assign(C, 0.0);
    add_chunks(p1, nc, C, s1.data());
    add_chunks(p2, nc, C, s2.data());
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
                                        const Tensor& f1, const Tensor& beta, int64_t act, at::ScalarType out_dtype,
                                        int64_t layout) {
  Geo g = geo_of(grad, layout);
  count(kGradStatsX, g.cl, sources[0]);
  auto terms = terms_of(sources, {static_cast<int64_t>(sources.size())});
  TermBwd t{mean.data_ptr<float>(), f1.data_ptr<float>(), beta.data_ptr<float>(), nullptr, nullptr, act,
            out_dtype == at::kBFloat16};
  std::vector<double> s1, s2;
  std::vector<void*> none;
  typed(grad, [&](auto* gp) {
    if (g.cl) feature_typed(terms[0][0].bf16, [&](auto* tag) {
      using TX = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
      term_backward_cl<TX>(gp, terms[0], none, t, g, kStats, s1, s2);
    });
    else term_backward_nchw(gp, terms[0], none, t, g, kStats, s1, s2);
  });
  return {per_channel(s1.data(), g, grad), per_channel(s2.data(), g, grad)};
}

std::vector<Tensor> input_grad_x(const Tensor& grad, at::TensorList sources, const Tensor& mean, const Tensor& f1,
                                 const Tensor& beta, int64_t act, at::ScalarType out_dtype,
                                 const std::optional<Tensor>& b, const Tensor& s1, int64_t layout) {
  Geo g = geo_of(grad, layout);
  count(kInputGradX, g.cl, sources[0]);
  auto terms = terms_of(sources, {static_cast<int64_t>(sources.size())});
  Tensor k0 = (f1 * s1).contiguous();
  TermBwd t{mean.data_ptr<float>(), f1.data_ptr<float>(), beta.data_ptr<float>(),
            b ? b->data_ptr<float>() : nullptr, k0.data_ptr<float>(), act, out_dtype == at::kBFloat16};
  std::vector<Tensor> out;
  std::vector<void*> ptrs;
  for (const Tensor& x : sources) {
    out.push_back(workspace_empty(x.sizes(), x.options(), g.cl));
    ptrs.push_back(out.back().data_ptr());
  }
  std::vector<double> s1d, s2d;
  typed(grad, [&](auto* gp) {
    if (g.cl) feature_typed(terms[0][0].bf16, [&](auto* tag) {
      using TX = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
      term_backward_cl<TX>(gp, terms[0], ptrs, t, g, kDx, s1d, s2d);
    });
    else term_backward_nchw(gp, terms[0], ptrs, t, g, kDx, s1d, s2d);
  });
  return out;
}

int64_t workspace_release() { return Workspace::get().release(); }
int64_t workspace_held() { return Workspace::get().held(); }

}  // namespace

TORCH_LIBRARY(bnff, m) {
  m.def("channel_stats(Tensor x, int layout) -> (Tensor, Tensor)");
  m.def("workspace_release() -> int", &workspace_release);
  m.def("workspace_held() -> int", &workspace_held);
  m.def("kernel_calls() -> (str[], int[])", &kernel_calls);
  m.def("apply(Tensor[] sources, int[] n_sources, Tensor[] means, Tensor[] f1s, Tensor[] betas, "
        "Tensor[] residuals, int act, ScalarType out_dtype, int layout) -> Tensor");
  m.def("grad_stats(Tensor grad, Tensor? a, int act, Tensor[] sources, int[] n_sources, Tensor[] means, "
        "int layout) -> (Tensor, Tensor[], Tensor[])");
  m.def("input_grad(Tensor dy, Tensor[] sources, Tensor mean, Tensor f1, Tensor? b, Tensor s1, int layout) "
        "-> Tensor[]");
  m.def("grad_stats_x(Tensor grad, Tensor[] sources, Tensor mean, Tensor f1, Tensor beta, int act, "
        "ScalarType out_dtype, int layout) -> (Tensor, Tensor)");
  m.def("input_grad_x(Tensor grad, Tensor[] sources, Tensor mean, Tensor f1, Tensor beta, int act, "
        "ScalarType out_dtype, Tensor? b, Tensor s1, int layout) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(bnff, CPU, m) {
  m.impl("channel_stats", &channel_stats);
  m.impl("apply", &apply);
  m.impl("grad_stats", &grad_stats);
  m.impl("input_grad", &input_grad);
  m.impl("grad_stats_x", &grad_stats_x);
  m.impl("input_grad_x", &input_grad_x);
}
