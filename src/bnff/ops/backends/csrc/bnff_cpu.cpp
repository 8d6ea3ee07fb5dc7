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

// Only the ATen headers the kernels use (torch/extension.h takes 4x as long to compile).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/strides.h>
#include <torch/library.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
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

namespace {

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

// ---- the formulas, on W lanes (channels of a row, or positions of a plane) -----------------------
// A BN term's contribution to z: F1 (x - mu) + beta (seed 002 eq. 12 with F1 = gamma / sigma).
BNFF_INLINE V term(V x, V mu, V f1, V beta) { return (x - mu) * f1 + beta; }

// The activation: one max (and min) per vector; NaN stays NaN, as in eager ReLU/ReLU6.
BNFF_INLINE V activate(V z, int64_t act) {
  if (act == kRelu) return at::vec::clamp_min(z, V(0.f));
  if (act == kRelu6) return at::vec::clamp(z, V(0.f), V(6.f));
  return z;
}
// dy = g * act'(z), the mask taken from the activation's output a (a > 0 iff z > 0, 0 < a < 6 iff
// 0 < z < 6); the mask of a NaN is 0, as in eager's threshold backward.
BNFF_INLINE V masked(V g, V a, int64_t act) {
  if (act == kRelu) return g & (a > V(0.f));
  if (act == kRelu6) return g & (a > V(0.f)) & (a < V(6.f));
  return g;
}
// dy of a lone BN term from its input x: the activation recomputed (rounded to the stored
// bfloat16 when the applied map is bfloat16: 5.99f stored as bfloat16 is 6, outside ReLU6's open
// interval) and its mask applied to g.
BNFF_INLINE V lone_dy(V g, V x, V mu, V f1, V beta, int64_t act, bool round) {
  if (act == kNone) return g;
  V z = activate(term(x, mu, f1, beta), act);
  if (round) z = round_bf16(z);
  return masked(g, z, act);
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

// A source map of a term: its data, its channel count and its offset in the term's channels.
struct Src {
  const void* p;
  int64_t c, off;
  template <typename T>
  const T* at() const { return static_cast<const T*>(p); }
  // NCHW: where plane (n, channel ch of the term) starts in this source map, in elements.
  int64_t plane(int64_t n, int64_t ch, int64_t hw) const { return (n * c + (ch - off)) * hw; }
};

std::vector<std::vector<Src>> terms_of(at::TensorList sources, at::IntArrayRef n_sources) {
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

int64_t n_chunks(int64_t rows) {
  int64_t want = std::max<int64_t>(1, rows / 64);
  return std::min<int64_t>(want, 8 * at::get_num_threads());
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

// f(n) with n a compile-time W for a full segment (its loads and stores then carry no tail test).
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

// f(k) with a count of BN terms of 1 or 2 (nearly every call) a compile-time constant; any other
// count at run time.
template <typename F>
BNFF_INLINE void with_count(int64_t k, F&& f) {
  if (k == 1) f(std::integral_constant<int64_t, 1>{});
  else if (k == 2) f(std::integral_constant<int64_t, 2>{});
  else f(k);
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

// out[i] += sum over chunks of part[ch * width + i]: the per-chunk partial sums of a reduction.
void add_chunks(const std::vector<double>& part, int64_t nc, int64_t width, double* out) {
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
void row_blocks(int64_t rows, int64_t nc, F&& body) {
  at::parallel_for(0, nc, 1, [&](int64_t b, int64_t e) {
    for (int64_t ch = b; ch < e; ++ch) {
      const int64_t r0 = ch * rows / nc, r1 = (ch + 1) * rows / nc;
      for (int64_t rb = r0; rb < r1; rb += kBlock) body(ch, rb, std::min(r1, rb + kBlock) - rb);
    }
  });
}

// Every (image, channel) plane of an NCHW sweep, split over threads: body(n, c).
template <typename F>
void planes(const Geo& g, int64_t C, F&& body) {
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

// ---- channel_stats ------------------------------------------------------------------------------
// Welford/Chan: each block (256 rows of a channels_last tile, or a run of an NCHW plane, in
// cache) gives its mean and M2 = sum (x - mean_b)^2 by two passes; blocks merge in double with
// Chan's formula. As accurate as ATen's var_mean; the raw one-sweep sum x^2 / m - mu^2, even on
// shifted data, is ~10x worse.
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

// z = sum_k term(x_k) + sum_j r_j, activated: the apply step on one vector. xs/rs give term k's and
// shortcut j's vector, get(p) a per-channel constant's.
template <typename X, typename R, typename Get>
BNFF_INLINE V applied(int64_t K, int64_t Rn, const TermVec* vec, X xs, R rs, Get get, int64_t act) {
  V z(0.f);
  for (int64_t k = 0; k < K; ++k) z += term(xs(k), get(vec[k].mu), get(vec[k].f1), get(vec[k].beta));
  for (int64_t j = 0; j < Rn; ++j) z += rs(j);
  return activate(z, act);
}

template <typename TX, typename TO>
void apply_kernel(const std::vector<std::vector<Src>>& terms, const std::vector<TermVec>& vec,
                  const std::vector<Src>& residuals, int64_t act, const Geo& g, TO* out) {
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
  with_act(act, [&](auto A) {
    with_terms(K, R, [&](auto KK, auto RR) {
      row_blocks(g.m(), n_chunks(g.m()), [&](int64_t, int64_t rb, int64_t nb) {
        for (int64_t r = rb; r < rb + nb; ++r) {
          for (const auto& q : sp) {
            with_width(q.n, [&](auto w) BNFF_LAMBDA {
              const V z = applied(
                  KK, RR, vec.data(), [&](int64_t k) BNFF_LAMBDA { return ld(q.xp[k] + r * q.xs[k], w); },
                  [&](int64_t j) BNFF_LAMBDA { return ld(rp[j] + r * C + q.c0, w); },
                  [&](const float* p) BNFF_LAMBDA { return per_lane(p, q.c0, w); }, A);
              st(out + r * C + q.c0, z, w);
            });
          }
        }
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

// ---- grad_stats ---------------------------------------------------------------------------------
// dy = g * act'(a) (written in g's dtype: exact); per term S1 = sum dy / m, S2c = sum dy (x - mu) / m.
// One vector of it: dy stored at dst, acc[0] += dy, acc[1 + k] += dy (x_k - mu_k).
template <typename TG, typename X, typename Mu>
BNFF_INLINE void grad_step(V* acc, V gv, V av, X xs, Mu mu_of, int64_t K, int64_t act, TG* dst, int64_t w) {
  const V d = masked(gv, av, act);
  st(dst, d, w);
  acc[0] += d;
  for (int64_t k = 0; k < K; ++k) acc[1 + k] += d * (xs(k) - mu_of(k));
}

// grad_stats over nv <= NV segments q[0..nv) (each of w lanes) and rows [rb, rb + nb): grad_step per vector,
// the tile's sums and means in registers; the sums are added in double to s1 (by channel) and s2
// (by term and channel).
template <int64_t NV, int64_t A, typename KT, typename TX, typename TG, typename Wd>
BNFF_INLINE void grad_stats_tile(const SegPtr<TX>* q, const TG* gp, const TX* a, const std::vector<const float*>& mus,
                                 KT K, int64_t C, int64_t rb, int64_t nb, Wd w, int64_t nv, TG* dy, double* s1,
                                 double* s2) {
  V mu[NV][kMaxTerms], acc[NV][1 + kMaxTerms];
  for (int64_t j = 0; j < NV; ++j) if (j < nv) {
    for (int64_t k = 0; k < K; ++k) mu[j][k] = per_lane(mus[k], q[j].c0, w);
    for (auto& v : acc[j]) v = V(0.f);
  }
  for (int64_t r = rb; r < rb + nb; ++r)
    for (int64_t j = 0; j < NV; ++j) if (j < nv) {
      const int64_t o = r * C + q[j].c0;
      grad_step(acc[j], ld(gp + o, w), A == kNone ? V(0.f) : ld(a + o, w),
                [&](int64_t k) BNFF_LAMBDA { return ld(q[j].xp[k] + r * q[j].xs[k], w); },
                [&](int64_t k) BNFF_LAMBDA { return mu[j][k]; }, K, A, dy + o, w);
    }
  for (int64_t j = 0; j < NV; ++j) if (j < nv) {
    const auto t1 = lanes(acc[j][0]);
    for (int64_t c = 0; c < int64_t(w); ++c) s1[q[j].c0 + c] += t1[c];
    for (int64_t k = 0; k < K; ++k) {
      const auto t2 = lanes(acc[j][1 + k]);
      for (int64_t c = 0; c < int64_t(w); ++c) s2[k * C + q[j].c0 + c] += t2[c];
    }
  }
}

template <typename TX, typename TG>
void grad_stats_kernel(const TG* gp, const TX* a, int64_t act, const std::vector<std::vector<Src>>& terms,
                       const std::vector<const float*>& mus, const Geo& g, TG* dy, std::vector<double>& s1,
                       std::vector<double>& s2) {
  const int64_t C = g.c, K = terms.size();
  TORCH_CHECK(K <= kMaxTerms, "bnff cpu grad_stats: at most ", kMaxTerms, " BN terms");
  s1.assign(C, 0.0);  // dy's channel sums are the same for every term
  s2.assign(K * C, 0.0);
  if (!a) act = kNone;
  if (!g.cl) {  // runtime activation and count, as in apply
    const int64_t HW = g.hw;
    at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        for (int64_t n = 0; n < g.n; ++n) {
          const TX* xp[kMaxTerms];
          term_planes(terms, n, c, HW, xp);
          const int64_t base = (n * C + c) * HW;
          for (int64_t i0 = 0; i0 < HW; i0 += kRun) {
            V acc[1 + kMaxTerms];
            for (auto& v : acc) v = V(0.f);
            vectors(i0, std::min(HW, i0 + kRun), [&](int64_t i, auto w) BNFF_LAMBDA {
              grad_step(acc, ld(gp + base + i, w), act == kNone ? V(0.f) : ld(a + base + i, w),
                        [&](int64_t k) BNFF_LAMBDA { return ld(xp[k] + i, w); }, [&](int64_t k) BNFF_LAMBDA { return per_plane(mus[k], c); },
                        K, act, dy + base + i, w);
            });
            s1[c] += lane_sum(acc[0]);
            for (int64_t k = 0; k < K; ++k) s2[k * C + c] += lane_sum(acc[1 + k]);
          }
        }
      }
    });
    return;
  }
  const int64_t rows = g.m(), nc = n_chunks(rows);
  const auto sp = seg_ptrs<TX>(segments(C, terms), terms);
  const size_t ns = sp.size();
  std::vector<double> p1(nc * C, 0.0), p2(nc * K * C, 0.0);
  const int64_t maps = 2 + (act != kNone) + K;  // g, dy, a, the terms' x
  // full segments in tiles of up to kTileBwd walked down each block, any other segment alone
  if (walk_tiles(C, kTileBwd, rows * C * int64_t(sizeof(TX) * (maps - 2) + sizeof(TG) * 2))) {
    with_act(act, [&](auto A) {
      with_count(K, [&](auto KK) {
        row_blocks(rows, nc, [&](int64_t ch, int64_t rb, int64_t nb) {
          double *q1 = &p1[ch * C], *q2 = &p2[ch * K * C];
          for (size_t i = 0, e; i < ns; i = e) {
            for (e = i; e < ns && e - i < size_t(kTileBwd) && sp[e].n == W;) ++e;
            if (e == i)
              grad_stats_tile<1, A>(&sp[e++], gp, a, mus, KK, C, rb, nb, sp[i].n, 1, dy, q1, q2);
            else
              grad_stats_tile<kTileBwd, A>(&sp[i], gp, a, mus, KK, C, rb, nb, std::integral_constant<int64_t, W>{},
                                           int64_t(e - i), dy, q1, q2);
          }
        });
      });
    });
    add_chunks(p1, nc, C, s1.data());
    add_chunks(p2, nc, K * C, s2.data());
    return;
  }
  with_act(act, [&](auto A) {
    with_count(K, [&](auto KK) {
      row_blocks(rows, nc, [&](int64_t ch, int64_t rb, int64_t nb) {
        std::vector<V> acc((1 + kMaxTerms) * ns, V(0.f));  // per segment: sum dy, then per term sum dy (x - mu)
        for (int64_t r = rb; r < rb + nb; ++r) {
          for (size_t i = 0; i < ns; ++i) {
            const auto& q = sp[i];
            with_width(q.n, [&](auto w) BNFF_LAMBDA {
              const int64_t o = r * C + q.c0;
              grad_step(&acc[(1 + kMaxTerms) * i], ld(gp + o, w), A == kNone ? V(0.f) : ld(a + o, w),
                        [&](int64_t k) BNFF_LAMBDA { return ld(q.xp[k] + r * q.xs[k], w); },
                        [&](int64_t k) BNFF_LAMBDA { return per_lane(mus[k], q.c0, w); }, KK, A, dy + o, w);
            });
          }
        }
        for (size_t i = 0; i < ns; ++i) {
          const int64_t c0 = sp[i].c0;
          const auto t1 = lanes(acc[(1 + kMaxTerms) * i]);
          for (int64_t c = 0; c < sp[i].n; ++c) p1[ch * C + c0 + c] += t1[c];
          for (int64_t k = 0; k < K; ++k) {
            const auto t2 = lanes(acc[(1 + kMaxTerms) * i + 1 + k]);
            for (int64_t c = 0; c < sp[i].n; ++c) p2[(ch * K + k) * C + c0 + c] += t2[c];
          }
        }
      });
    });
  });
  add_chunks(p1, nc, C, s1.data());
  add_chunks(p2, nc, K * C, s2.data());
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
  if (act != kNone)
    TORCH_CHECK(a.has_value(), "bnff cpu grad_stats: the activation output is needed for its mask");
  const Tensor& feature = sources.empty() ? (a ? *a : grad) : sources[0];
  count(kGradStats, g.cl, feature);
  Tensor dy = workspace_empty(grad.sizes(), grad.options(), g.cl);
  auto terms = terms_of(sources, n_sources);
  std::vector<const float*> mus;
  for (const Tensor& m : means) mus.push_back(m.data_ptr<float>());
  std::vector<double> s1, s2;
  const at::ScalarType tx = act != kNone ? a->scalar_type() : feature.scalar_type();
  BNFF_DISPATCH(grad.scalar_type(), "bnff::grad_stats", [&] {
    using TG = scalar_t;
    BNFF_DISPATCH(tx, "bnff::grad_stats", [&] {
      grad_stats_kernel<scalar_t, TG>(grad.data_ptr<TG>(), act != kNone ? a->data_ptr<scalar_t>() : nullptr, act,
                                      terms, mus, g, dy.data_ptr<TG>(), s1, s2);
    });
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
template <typename TD, typename TX>
void input_grad_kernel(const TD* dy, const TX* x, TX* dx, const Geo& g, int64_t C_total, int64_t off,
                       int64_t Cj, const float* f1, const float* b, const float* mu, const float* k0) {
  if (g.cl) {
    const int64_t rows = g.m();
    row_blocks(rows, std::min<int64_t>(rows, 8 * at::get_num_threads()), [&](int64_t, int64_t rb, int64_t nb) {
      for (int64_t r = rb; r < rb + nb; ++r) {
        for (int64_t c0 = 0; c0 < Cj; c0 += W) {
          with_width(std::min(W, Cj - c0), [&](auto w) BNFF_LAMBDA {
            const DxVec v = dx_vec([&](const float* p) BNFF_LAMBDA { return per_lane(p, c0, w); }, f1, b, mu, k0);
            const V d = ld(dy + r * C_total + off + c0, w);
            st(dx + r * Cj + c0, dx_of(d, b ? ld(x + r * Cj + c0, w) : V(0.f), v), w);
          });
        }
      }
    });
  } else {
    const int64_t HW = g.hw;
    planes(g, Cj, [&](int64_t n, int64_t c) {
      const DxVec v = dx_vec([&](const float* p) BNFF_LAMBDA { return per_plane(p, c); }, f1, b, mu, k0);
      const TD* dr = dy + (n * C_total + off + c) * HW;
      const int64_t xo = (n * Cj + c) * HW;
      vectors(0, HW, [&](int64_t i, auto w) BNFF_LAMBDA {
        st(dx + xo + i, dx_of(ld(dr + i, w), b ? ld(x + xo + i, w) : V(0.f), v), w);
      });
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
    BNFF_DISPATCH(dy.scalar_type(), "bnff::input_grad", [&] {
      using TD = scalar_t;
      BNFF_DISPATCH(x.scalar_type(), "bnff::input_grad", [&] {
        input_grad_kernel(dy.data_ptr<TD>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), g, g.c, off, Cj,
                          f1.data_ptr<float>() + off, bp, mean.data_ptr<float>() + off, k0.data_ptr<float>() + off);
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
// S2 and for dx) instead of reading a and a written dy (lone_dy). Mode kStats reduces S1, S2c;
// mode kDx writes dx = F1 dy + B (x - mu) - F1 S1 onto each source map.
enum Mode { kStats = 0, kDx = 1 };

struct TermBwd {  // one BN term's per-channel vectors (C,), offset by each source's .off
  const float *mu, *f1, *beta, *b, *k0;
  int64_t act;
  bool round_bf16;
};

// acc[0] += dy, acc[1] += dy (x - mu): the lone-term backward's S1 and S2c sums, per lane.
BNFF_INLINE void lone_sums(V d, V x, V mu, V* acc) {
  acc[0] += d;
  acc[1] += d * (x - mu);
}

// S1 and S2c of nv <= NV segments q[0..nv) (each of w lanes) over rows [rb, rb + nb), added in double to
// s1 and s2 (indexed by channel): lone_step's arithmetic, each lane's sums in row order as a
// row-by-row walk adds them, the tile's sums and constants in registers.
template <int64_t NV, int64_t A, bool Round, typename TX, typename TG, typename Wd>
BNFF_INLINE void lone_stats_tile(const SegPtr<TX>* q, const TG* gp, int64_t C, int64_t rb, int64_t nb,
                                 const TermBwd& t, Wd w, int64_t nv, double* s1, double* s2) {
  V mu[NV], f1[NV], beta[NV], acc[NV][2];
  for (int64_t j = 0; j < NV; ++j) if (j < nv) {
    mu[j] = per_lane(t.mu, q[j].c0, w);
    f1[j] = per_lane(t.f1, q[j].c0, w);
    beta[j] = per_lane(t.beta, q[j].c0, w);
    acc[j][0] = acc[j][1] = V(0.f);
  }
  for (int64_t r = rb; r < rb + nb; ++r)
    for (int64_t j = 0; j < NV; ++j) if (j < nv) {
      const V x = ld(q[j].xp[0] + r * q[j].xs[0], w);
      lone_sums(lone_dy(ld(gp + r * C + q[j].c0, w), x, mu[j], f1[j], beta[j], A, Round), x, mu[j], acc[j]);
    }
  for (int64_t j = 0; j < NV; ++j) if (j < nv) {
    const auto a1 = lanes(acc[j][0]), a2 = lanes(acc[j][1]);
    for (int64_t c = 0; c < int64_t(w); ++c) {
      s1[q[j].c0 + c] += a1[c];
      s2[q[j].c0 + c] += a2[c];
    }
  }
}

// One vector of the lone-term backward: x and g in, the constants from get; in kStats mode
// acc[0] += dy, acc[1] += dy (x - mu), in kDx mode dx stored at dst.
template <typename TX, typename Get>
BNFF_INLINE void lone_step(V x, V gv, const TermBwd& t, Get get, int64_t act, bool round, bool stats, V* acc,
                           TX* dst, int64_t w) {
  const V mu = get(t.mu);
  const V d = lone_dy(gv, x, mu, get(t.f1), get(t.beta), act, round);
  if (stats) {
    lone_sums(d, x, mu, acc);
  } else {
    st(dst, dx_of(d, x, dx_vec(get, t.f1, t.b, t.mu, t.k0)), w);
  }
}

template <typename TX, typename TG>
void term_backward(const TG* gp, const std::vector<Src>& srcs, const std::vector<void*>& dxs, const TermBwd& t,
                   const Geo& g, Mode mode, std::vector<double>& s1, std::vector<double>& s2) {
  const int64_t C = g.c;
  s1.assign(C, 0.0);
  s2.assign(C, 0.0);
  if (!g.cl) {  // runtime activation, mode and rounding, as in apply
    const int64_t HW = g.hw;
    const bool stats = mode == kStats;
    at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        const Src& s = source_of(srcs, c);
        const size_t j = &s - srcs.data();
        for (int64_t n = 0; n < g.n; ++n) {
          const int64_t xo = s.plane(n, c, HW), go = (n * C + c) * HW;
          const TX* xp = s.at<TX>() + xo;
          TX* dst = stats ? nullptr : static_cast<TX*>(dxs[j]) + xo;
          for (int64_t i0 = 0; i0 < HW; i0 += kRun) {
            V acc[2] = {V(0.f), V(0.f)};
            vectors(i0, std::min(HW, i0 + kRun), [&](int64_t i, auto w) BNFF_LAMBDA {
              lone_step(ld(xp + i, w), ld(gp + go + i, w), t, [&](const float* p) BNFF_LAMBDA { return per_plane(p, c); }, t.act,
                        t.round_bf16, stats, acc, stats ? nullptr : dst + i, w);
            });
            if (stats) {
              s1[c] += lane_sum(acc[0]);
              s2[c] += lane_sum(acc[1]);
            }
          }
        }
      }
    });
    return;
  }
  const int64_t rows = g.m();
  const int64_t nc = mode == kStats ? n_chunks(rows) : std::min<int64_t>(rows, 8 * at::get_num_threads());
  const auto segs = segments(C, {srcs});
  const auto sp = seg_ptrs<TX>(segs, {srcs});
  const size_t ns = sp.size();
  std::vector<TX*> dxp(ns, nullptr);  // where segment i of dx starts (row 0), row stride sp[i].xs[0]
  for (size_t i = 0; mode == kDx && i < ns; ++i) {
    const Src& s = srcs[segs[i].src[0]];
    dxp[i] = static_cast<TX*>(dxs[segs[i].src[0]]) + (segs[i].c0 - s.off);
  }
  std::vector<double> p1(mode == kStats ? nc * C : 0, 0.0), p2(mode == kStats ? nc * C : 0, 0.0);
  if (mode == kStats && walk_tiles(C, kTileBwd, rows * C * int64_t(sizeof(TX) + sizeof(TG)))) {
    // full segments in tiles of up to kTileBwd walked down each block, any other segment alone
    with_act(t.act, [&](auto A) {
      with_flag(t.round_bf16, [&](auto round) {
        row_blocks(rows, nc, [&](int64_t ch, int64_t rb, int64_t nb) {
          double *q1 = &p1[ch * C], *q2 = &p2[ch * C];
          for (size_t i = 0, e; i < ns; i = e) {
            for (e = i; e < ns && e - i < size_t(kTileBwd) && sp[e].n == W;) ++e;
            if (e == i)
              lone_stats_tile<1, A, round>(&sp[e++], gp, C, rb, nb, t, sp[i].n, 1, q1, q2);
            else
              lone_stats_tile<kTileBwd, A, round>(&sp[i], gp, C, rb, nb, t, std::integral_constant<int64_t, W>{},
                                                  int64_t(e - i), q1, q2);
          }
        });
      });
    });
    add_chunks(p1, nc, C, s1.data());
    add_chunks(p2, nc, C, s2.data());
    return;
  }
  // the activation, the mode and the rounding as compile-time constants: no tests per vector
  with_act(t.act, [&](auto A) {
    with_flag(mode == kStats, [&](auto stats) {
      with_flag(t.round_bf16, [&](auto round) {
        row_blocks(rows, nc, [&](int64_t ch, int64_t rb, int64_t nb) {
          std::vector<V> acc(stats ? 2 * ns : 0, V(0.f));  // per segment: the block's S1, then S2c sums
          for (int64_t r = rb; r < rb + nb; ++r) {
            for (size_t i = 0; i < ns; ++i) {
              const auto& q = sp[i];
              with_width(q.n, [&](auto w) BNFF_LAMBDA {
                lone_step(ld(q.xp[0] + r * q.xs[0], w), ld(gp + r * C + q.c0, w), t,
                          [&](const float* p) BNFF_LAMBDA { return per_lane(p, q.c0, w); }, A, round, stats,
                          stats ? &acc[2 * i] : nullptr, stats ? nullptr : dxp[i] + r * q.xs[0], w);
              });
            }
          }
          for (size_t i = 0; stats && i < ns; ++i) {
            const auto a1 = lanes(acc[2 * i]), a2 = lanes(acc[2 * i + 1]);
            for (int64_t c = 0; c < sp[i].n; ++c) {
              p1[ch * C + sp[i].c0 + c] += a1[c];
              p2[ch * C + sp[i].c0 + c] += a2[c];
            }
          }
        });
      });
    });
  });
  if (mode == kStats) {
    add_chunks(p1, nc, C, s1.data());
    add_chunks(p2, nc, C, s2.data());
  }
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
  BNFF_DISPATCH(grad.scalar_type(), "bnff::grad_stats_x", [&] {
    using TG = scalar_t;
    BNFF_DISPATCH(sources[0].scalar_type(), "bnff::grad_stats_x", [&] {
      term_backward<scalar_t>(grad.data_ptr<TG>(), terms[0], {}, t, g, kStats, s1, s2);
    });
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
  BNFF_DISPATCH(grad.scalar_type(), "bnff::input_grad_x", [&] {
    using TG = scalar_t;
    BNFF_DISPATCH(sources[0].scalar_type(), "bnff::input_grad_x", [&] {
      term_backward<scalar_t>(grad.data_ptr<TG>(), terms[0], ptrs, t, g, kDx, s1d, s2d);
    });
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

}  // namespace

TORCH_LIBRARY(bnff, m) {
  m.def("channel_stats(Tensor x, int layout) -> (Tensor, Tensor)");
  m.def("workspace_release() -> int", &workspace_release);
  m.def("workspace_held() -> int", &workspace_held);
  m.def("kernel_calls() -> (str[], int[])", &kernel_calls);
  m.def("scale(Tensor var, Tensor? gamma, float eps) -> Tensor");
  m.def("backward_vectors(Tensor var, Tensor f1, Tensor s1, Tensor s2c, Tensor s2c_dx, int m, float eps, bool batch) "
        "-> (Tensor?, Tensor, Tensor)");
  m.def("running_update(Tensor(a!) rm, Tensor(b!) rv, Tensor mean, Tensor var, float factor, int m) -> ()");
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
  m.impl("scale", &scale);
  m.impl("backward_vectors", &backward_vectors);
  m.impl("running_update", &running_update);
}
