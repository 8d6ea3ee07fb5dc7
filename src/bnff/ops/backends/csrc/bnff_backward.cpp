// bnff's fused CPU sweeps, the backward's two steps: grad_stats and input_grad (bnff_sweeps.h says what
// the kernels share; bnff_cpu.cpp registers the schemas).
#include "bnff_sweeps.h"

namespace bnff_cpu {

// ---- grad_stats ---------------------------------------------------------------------------------
// dy = g * act'(t) (written in g's dtype: exact for ReLU's and ReLU6's masks); per term
// S1 = sum dy / m, S2c = sum dy (x - mu) / m. What the derivative reads, t: the activation output a
// (saved or recomputed), or the pre-activation z recomputed from the terms' x (read for S2c anyway),
// their mean, F1, beta and the shortcuts, as apply formed it (preact).
template <typename TX>
struct Reads {
  const TX* a;                 // the activation output, when act reads it
  const TermVec* vec;          // the terms' vectors, when act reads z
  const TX* rp[kMaxTerms];     // the shortcuts, when act reads z
  int64_t R;
};

// t for the vector at offset o of the maps of g's shape (a, the shortcuts); xs(k) the terms' x there,
// get(p) a per-channel constant's vector.
template <typename TX, typename AT, typename KT, typename X, typename Get, typename Wd>
BNFF_INLINE V derivative_input(const Reads<TX>& rd, AT A, KT K, int64_t o, X xs, Get get, Wd w) {
  if (A == kNone) return V(0.f);
  if (from_z(A))
    return preact(K, rd.R, rd.vec, xs, [&](int64_t j) BNFF_LAMBDA { return ld(rd.rp[j] + o, w); }, get);
  return ld(rd.a + o, w);
}

// One vector: dy stored at dst, acc[0] += dy, acc[1 + k] += dy (x_k - mu_k).
template <typename TG, typename X, typename Mu>
BNFF_INLINE void grad_step(V* acc, V gv, V tv, X xs, Mu mu_of, int64_t K, int64_t act, TG* dst, int64_t w) {
  const V d = grad_of(gv, tv, act);
  st(dst, d, w);
  acc[0] += d;
  for (int64_t k = 0; k < K; ++k) acc[1 + k] += d * (xs(k) - mu_of(k));
}

// grad_stats over nv <= NV segments q[0..nv) (each of w lanes) and rows [rb, rb + nb): grad_step per vector,
// the tile's sums and means in registers; the sums are added in double to s1 (by channel) and s2
// (by term and channel).
template <int64_t NV, typename AT, typename KT, typename TX, typename TG, typename Wd>
BNFF_INLINE void grad_stats_tile(const SegPtr<TX>* q, const TG* gp, const Reads<TX>& rd, const std::vector<const float*>& mus,
                                 AT A, KT K, int64_t C, int64_t rb, int64_t nb, Wd w, int64_t nv, TG* dy, double* s1,
                                 double* s2) {
  V mu[NV][kMaxTerms], acc[NV][1 + kMaxTerms];
  for (int64_t j = 0; j < NV; ++j) if (j < nv) {
    for (int64_t k = 0; k < K; ++k) mu[j][k] = per_lane(mus[k], q[j].c0, w);
    for (auto& v : acc[j]) v = V(0.f);
  }
  for (int64_t r = rb; r < rb + nb; ++r)
    for (int64_t j = 0; j < NV; ++j) if (j < nv) {
      const int64_t o = r * C + q[j].c0;
      const auto xs = [&](int64_t k) BNFF_LAMBDA { return ld(q[j].xp[k] + r * q[j].xs[k], w); };
      const V tv = derivative_input(rd, A, K, o, xs, [&](const float* p) BNFF_LAMBDA { return per_lane(p, q[j].c0, w); }, w);
      grad_step(acc[j], ld(gp + o, w), tv, xs, [&](int64_t k) BNFF_LAMBDA { return mu[j][k]; }, K, A, dy + o, w);
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
void grad_stats_kernel(const TG* gp, const Reads<TX>& rd, int64_t act_arg, const std::vector<std::vector<Src>>& terms,
                       const std::vector<const float*>& mus, const Geo& g, TG* dy, std::vector<double>& s1,
                       std::vector<double>& s2) {
  const int64_t act = act_for<TX>(act_arg);
  const int64_t C = g.c, K = terms.size();
  TORCH_CHECK(K <= kMaxTerms, "bnff cpu grad_stats: at most ", kMaxTerms, " BN terms");
  s1.assign(C, 0.0);  // dy's channel sums are the same for every term
  s2.assign(K * C, 0.0);
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
              const auto xs = [&](int64_t k) BNFF_LAMBDA { return ld(xp[k] + i, w); };
              const auto get = [&](const float* p) BNFF_LAMBDA { return per_plane(p, c); };
              grad_step(acc, ld(gp + base + i, w), derivative_input(rd, act, K, base + i, xs, get, w), xs,
                        [&](int64_t k) BNFF_LAMBDA { return get(mus[k]); }, K, act, dy + base + i, w);
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
  const int64_t reads = act == kNone ? 0 : from_z(act) ? rd.R : 1;  // a, or the shortcuts
  const int64_t maps = 2 + reads + K;  // g, dy, what the derivative reads, the terms' x
  // full segments in tiles of up to kTileBwd walked down each block, any other segment alone
  // (the activations other than none, ReLU and ReLU6 walk rows: a row of t and g, then act_grad_n over it)
  if (inline_act(act) && walk_tiles(C, kTileBwd, rows * C * int64_t(sizeof(TX) * (maps - 2) + sizeof(TG) * 2))) {
    with_act<false>(act, [&](auto A) {
      with_count(K, [&](auto KK) {
        row_blocks(rows, nc, [&](int64_t ch, int64_t rb, int64_t nb) {
          double *q1 = &p1[ch * C], *q2 = &p2[ch * K * C];
          for (size_t i = 0, e; i < ns; i = e) {
            for (e = i; e < ns && e - i < size_t(kTileBwd) && sp[e].n == W;) ++e;
            if (e == i)
              grad_stats_tile<1>(&sp[e++], gp, rd, mus, A, KK, C, rb, nb, sp[i].n, 1, dy, q1, q2);
            else
              grad_stats_tile<kTileBwd>(&sp[i], gp, rd, mus, A, KK, C, rb, nb, std::integral_constant<int64_t, W>{},
                                        int64_t(e - i), dy, q1, q2);
          }
        });
      });
    });
    add_chunks(p1, nc, C, s1.data());
    add_chunks(p2, nc, K * C, s2.data());
    return;
  }
  with_act<true, TX>(act, [&](auto A) {
    constexpr bool rows_of_t = runtime_act<decltype(A)>;
    with_count_for(A, K, [&](auto KK) {
      row_blocks(rows, nc, [&](int64_t ch, int64_t rb, int64_t nb) {
        std::vector<V> acc((1 + kMaxTerms) * ns, V(0.f));  // per segment: sum dy, then per term sum dy (x - mu)
        std::vector<float> gbuf(rows_of_t ? C : 0), tbuf(rows_of_t ? C : 0);
        for (int64_t r = rb; r < rb + nb; ++r) {
          if constexpr (rows_of_t) {  // dy of the row into gbuf
            for (const auto& q : sp)
              with_width(q.n, [&](auto w) BNFF_LAMBDA {
                const int64_t o = r * C + q.c0;
                const auto xs = [&](int64_t k) BNFF_LAMBDA { return ld(q.xp[k] + r * q.xs[k], w); };
                const auto get = [&](const float* p) BNFF_LAMBDA { return per_lane(p, q.c0, w); };
                st(tbuf.data() + q.c0, derivative_input(rd, A, KK, o, xs, get, w), w);
                st(gbuf.data() + q.c0, ld(gp + o, w), w);
              });
            act_grad_n(gbuf.data(), tbuf.data(), C, A);
          }
          for (size_t i = 0; i < ns; ++i) {
            const auto& q = sp[i];
            with_width(q.n, [&](auto w) BNFF_LAMBDA {
              const int64_t o = r * C + q.c0;
              const auto xs = [&](int64_t k) BNFF_LAMBDA { return ld(q.xp[k] + r * q.xs[k], w); };
              const auto get = [&](const float* p) BNFF_LAMBDA { return per_lane(p, q.c0, w); };
              const auto mu = [&](int64_t k) BNFF_LAMBDA { return get(mus[k]); };
              if constexpr (rows_of_t)
                grad_step(&acc[(1 + kMaxTerms) * i], ld(gbuf.data() + q.c0, w), V(0.f), xs, mu, KK, kNone, dy + o, w);
              else
                grad_step(&acc[(1 + kMaxTerms) * i], ld(gp + o, w), derivative_input(rd, A, KK, o, xs, get, w), xs, mu,
                          KK, A, dy + o, w);
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

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> grad_stats(
    const Tensor& grad, const std::optional<Tensor>& a, int64_t act, at::TensorList sources,
    at::IntArrayRef n_sources, at::TensorList means, at::TensorList f1s, at::TensorList betas,
    at::TensorList residuals, int64_t layout) {
  Geo g = geo_of(grad, layout);
  const bool reads_a = act != kNone && !from_z(act);
  TORCH_CHECK(!reads_a || a.has_value(), "bnff cpu grad_stats: the activation output is needed for its derivative");
  TORCH_CHECK(!from_z(act) || (f1s.size() == means.size() && betas.size() == means.size()),
              "bnff cpu grad_stats: the pre-activation needs every term's F1 and beta");
  TORCH_CHECK(residuals.size() <= size_t(kMaxTerms), "bnff cpu grad_stats: at most ", kMaxTerms, " shortcuts");
  const Tensor& feature = sources.empty() ? (a ? *a : grad) : sources[0];
  count(kGradStats, g.cl, feature);
  Tensor dy = workspace_empty(grad.sizes(), grad.options(), g.cl);
  auto terms = terms_of(sources, n_sources);
  std::vector<const float*> mus;
  for (const Tensor& m : means) mus.push_back(m.data_ptr<float>());
  const auto vec = from_z(act) ? vecs_of(means, f1s, betas) : std::vector<TermVec>{};
  std::vector<double> s1, s2;
  const at::ScalarType tx = reads_a ? a->scalar_type() : feature.scalar_type();
  BNFF_DISPATCH(grad.scalar_type(), "bnff::grad_stats", [&] {
    using TG = scalar_t;
    BNFF_DISPATCH(tx, "bnff::grad_stats", [&] {
      Reads<scalar_t> rd{reads_a ? a->data_ptr<scalar_t>() : nullptr, vec.data(), {}, 0};
      for (const Tensor& r : from_z(act) ? residuals : at::TensorList{}) rd.rp[rd.R++] = r.data_ptr<scalar_t>();
      grad_stats_kernel<scalar_t, TG>(grad.data_ptr<TG>(), rd, act, terms, mus, g, dy.data_ptr<TG>(), s1, s2);
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
  Tensor k0 = k0_of(f1, s1);
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

}  // namespace bnff_cpu
