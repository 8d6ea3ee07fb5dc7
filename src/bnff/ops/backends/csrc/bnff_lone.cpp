// bnff's fused CPU sweeps, the backward of a lone BN term without shortcut: grad_stats_x and
// input_grad_x, which recompute the activation's derivative from x instead of reading a written dy
// (bnff_sweeps.h says what the kernels share; bnff_cpu.cpp registers the schemas).
#include "bnff_sweeps.h"

namespace bnff_cpu {

// ---- the backward of a lone BN feeding consumers, without dy ----------------------------------------
// For a group of one BN term and no shortcut (patterns (2), (3), DenseNet's ICF), dy = g * act'(a)
// need not be written: both backward sweeps recompute the mask from x (which they read anyway for
// S2 and for dx) instead of reading a and a written dy (lone_dy). Mode kStats reduces S1, S2c;
// mode kDx writes dx = F1 dy + B (x - mu) - F1 S1 onto each source map.
enum Mode { kStats = 0, kDx = 1 };

// acc[0] += dy, acc[1] += dy (x - mu): the lone-term backward's S1 and S2c sums, per lane.
BNFF_INLINE void lone_sums(V d, V x, V mu, V* acc) {
  acc[0] += d;
  acc[1] += d * (x - mu);
}

// S1 and S2c of nv <= NV segments q[0..nv) (each of w lanes) over rows [rb, rb + nb), added in double to
// s1 and s2 (indexed by channel): lone_step's arithmetic, each lane's sums in row order as a
// row-by-row walk adds them, the tile's sums and constants in registers.
template <int64_t NV, typename AT, typename RT, typename TX, typename TG, typename Wd>
BNFF_INLINE void lone_stats_tile(AT A, RT Round, const SegPtr<TX>* q, const TG* gp, int64_t C, int64_t rb, int64_t nb,
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

// The tile walk of kStats over rows [rb, rb + nb) (activations none, ReLU, ReLU6): full segments in
// tiles of up to kTileBwd walked down the rows, any other segment alone; the sums added to q1, q2.
template <typename AT, typename RT, typename TX, typename TG>
void lone_stats_tiles(AT A, RT round, const std::vector<SegPtr<TX>>& sp, const TG* gp, int64_t C, int64_t rb,
                      int64_t nb, const TermBwd& t, double* q1, double* q2) {
  const size_t ns = sp.size();
  for (size_t i = 0, e; i < ns; i = e) {
    for (e = i; e < ns && e - i < size_t(kTileBwd) && sp[e].n == W;) ++e;
    if (e == i)
      lone_stats_tile<1>(A, round, &sp[e++], gp, C, rb, nb, t, sp[i].n, 1, q1, q2);
    else
      lone_stats_tile<kTileBwd>(A, round, &sp[i], gp, C, rb, nb, t, std::integral_constant<int64_t, W>{},
                                int64_t(e - i), q1, q2);
  }
}

// The row walk over rows [rb, rb + nb), every segment of a row in turn: kStats adds the rows' sums to
// q1, q2 (indexed by channel); kDx writes dx at dxp[i] + r * row stride. A run-time activation forms
// the row's dy in a buffer first (lone_grad_n).
template <typename AT, typename ST, typename RT, typename TX, typename TG>
void lone_rows(AT A, ST stats, RT round, const std::vector<SegPtr<TX>>& sp, TX* const* dxp, const TG* gp, int64_t C,
               int64_t rb, int64_t nb, const TermBwd& t, double* q1, double* q2) {
  constexpr bool rows_of_z = runtime_act<AT>;
  const size_t ns = sp.size();
  std::vector<V> acc(stats ? 2 * ns : 0, V(0.f));  // per segment: the rows' S1, then S2c sums
  std::vector<float> gbuf(rows_of_z ? C : 0), zbuf(rows_of_z ? C : 0);
  for (int64_t r = rb; r < rb + nb; ++r) {
    if constexpr (rows_of_z) {  // dy of the row into gbuf
      for (const auto& q : sp)
        with_width(q.n, [&](auto w) BNFF_LAMBDA {
          const auto get = [&](const float* p) BNFF_LAMBDA { return per_lane(p, q.c0, w); };
          st(zbuf.data() + q.c0, term(ld(q.xp[0] + r * q.xs[0], w), get(t.mu), get(t.f1), get(t.beta)), w);
          st(gbuf.data() + q.c0, ld(gp + r * C + q.c0, w), w);
        });
      lone_grad_n(gbuf.data(), zbuf.data(), C, A, round);
    }
    for (size_t i = 0; i < ns; ++i) {
      const auto& q = sp[i];
      with_width(q.n, [&](auto w) BNFF_LAMBDA {
        const auto get = [&](const float* p) BNFF_LAMBDA { return per_lane(p, q.c0, w); };
        const V x = ld(q.xp[0] + r * q.xs[0], w);
        V* a = stats ? &acc[2 * i] : nullptr;
        TX* dst = stats ? nullptr : dxp[i] + r * q.xs[0];
        if constexpr (rows_of_z)
          lone_step(x, ld(gbuf.data() + q.c0, w), t, get, kNone, false, stats, a, dst, w);
        else
          lone_step(x, ld(gp + r * C + q.c0, w), t, get, A, round, stats, a, dst, w);
      });
    }
  }
  for (size_t i = 0; stats && i < ns; ++i) {
    const auto a1 = lanes(acc[2 * i]), a2 = lanes(acc[2 * i + 1]);
    for (int64_t c = 0; c < sp[i].n; ++c) {
      q1[sp[i].c0 + c] += a1[c];
      q2[sp[i].c0 + c] += a2[c];
    }
  }
}

template <typename TX, typename TG>
void term_backward(const TG* gp, const std::vector<Src>& srcs, const std::vector<void*>& dxs, const TermBwd& t_arg,
                   const Geo& g, Mode mode, std::vector<double>& s1, std::vector<double>& s2) {
  TermBwd t = t_arg;
  t.act = act_for<TX>(t.act);
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
  if (mode == kStats && inline_act(t.act) && walk_tiles(C, kTileBwd, rows * C * int64_t(sizeof(TX) + sizeof(TG)))) {
    // full segments in tiles of up to kTileBwd walked down each block, any other segment alone (the
    // activations other than none, ReLU and ReLU6 walk rows: a row of z and g, then lone_grad_n over it)
    with_act<false>(t.act, [&](auto A) {
      with_flag(t.round_bf16, [&](auto round) {
        row_blocks(rows, nc, [&](int64_t ch, int64_t rb, int64_t nb) {
          lone_stats_tiles(A, round, sp, gp, C, rb, nb, t, &p1[ch * C], &p2[ch * C]);
        });
      });
    });
    add_chunks(p1, nc, C, s1.data());
    add_chunks(p2, nc, C, s2.data());
    return;
  }
  // the activation, the mode and the rounding as compile-time constants: no tests per vector
  with_act<true, TX>(t.act, [&](auto A) {
    with_flag(mode == kStats, [&](auto stats) {
      with_flag_for(A, t.round_bf16, [&](auto round) {
        row_blocks(rows, nc, [&](int64_t ch, int64_t rb, int64_t nb) {
          lone_rows(A, stats, round, sp, dxp.data(), gp, C, rb, nb, t, stats ? &p1[ch * C] : nullptr,
                    stats ? &p2[ch * C] : nullptr);
        });
      });
    });
  });
  if (mode == kStats) {
    add_chunks(p1, nc, C, s1.data());
    add_chunks(p2, nc, C, s2.data());
  }
}

void lone_block_stats(const std::vector<Src>& srcs, const TermBwd& t_arg, at::ScalarType xt, const void* g,
                      at::ScalarType gt, int64_t C, int64_t rb, int64_t nb, double* q1, double* q2) {
  const auto segs = segments(C, {srcs});
  BNFF_DISPATCH(gt, "bnff::lone_block_stats", [&] {
    using TG = scalar_t;
    const TG* gp = static_cast<const TG*>(g);
    BNFF_DISPATCH(xt, "bnff::lone_block_stats", [&] {
      using TX = scalar_t;
      TermBwd t = t_arg;
      t.act = act_for<TX>(t.act);
      const auto sp = seg_ptrs<TX>(segs, {srcs});
      with_act<true, TX>(t.act, [&](auto A) {
        with_flag_for(A, t.round_bf16, [&](auto round) {
          if constexpr (!runtime_act<decltype(A)>) {
            if constexpr (inline_act(decltype(A)::value)) {
              lone_stats_tiles(A, round, sp, gp, C, rb, nb, t, q1, q2);
              return;
            }
          }
          lone_rows(A, std::true_type{}, round, sp, static_cast<TX* const*>(nullptr), gp, C, rb, nb, t, q1, q2);
        });
      });
    });
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
  Tensor k0 = k0_of(f1, s1);
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

}  // namespace bnff_cpu
