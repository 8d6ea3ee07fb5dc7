// bnff's group executor: a fused group's forward, and its backward, each as one call.
//
// bnff/ops/fused.py runs a group's `bnff` schedule (bnff.plan.schemes) step by step in Python: for
// every group and training step some twenty Python calls, checks and small lists around its few
// sweeps, which cost more than the sweeps on small maps. When the cpu backend covers the whole call
// (fused._executor says when), the same schedule, compiled into integers (fused._Program), runs
// here instead: the same sweeps (called through the dispatcher by their registered names, so they
// are the kernels of bnff_cpu.cpp and its sibling units, counted in kernel_calls), the same per-channel vectors and the
// same convolution calls as the Python steps, in the same order, so the results are the same bits.
// Nothing here decides what runs: the steps come from the plan, the layout and the coverage from
// the Python side (bnff.ops.backends.cpu's rule), as for every sweep.
//
// Arguments, as bnff/ops/fused.py writes them:
//   flat       the group's flat argument list (fused._Layout): per BN term its source maps, mean,
//              var, gamma, beta; the shortcuts; per consumer its weight and bias (None: absent)
//   terms      per BN term 6 ints: first source, number of sources, mean, var, gamma, beta (positions)
//   residuals  2 ints: first shortcut, number of shortcuts
//   convs      per consumer 9 ints: weight position (bias at +1), has bias, stride, padding,
//              dilation (rows, columns each), groups
//   steps      per step 5 ints: kind (BNFF_STEP_*), term, consumer, then whether a and g_a are
//              no longer needed after it (fused._free_after)
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---- the sweeps and vector kernels, by their registered schemas (bnff_cpu.cpp) -----------------
template <class Sig>
c10::TypedOperatorHandle<Sig> sweep(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
using ApplySig = Tensor(at::TensorList, at::IntArrayRef, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                        int64_t, at::ScalarType, int64_t);
using GradStatsSig = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>>(
    const Tensor&, const OptTensor&, int64_t, at::TensorList, at::IntArrayRef, at::TensorList, at::TensorList,
    at::TensorList, at::TensorList, int64_t);
using InputGradSig = std::vector<Tensor>(const Tensor&, at::TensorList, const Tensor&, const Tensor&, const OptTensor&,
                                         const Tensor&, int64_t);
using GradStatsXSig = std::tuple<Tensor, Tensor>(const Tensor&, at::TensorList, const Tensor&, const Tensor&,
                                                 const Tensor&, int64_t, at::ScalarType, int64_t);
using InputGradXSig = std::vector<Tensor>(const Tensor&, at::TensorList, const Tensor&, const Tensor&, const Tensor&,
                                          int64_t, at::ScalarType, const OptTensor&, const Tensor&, int64_t);
using ScaleSig = Tensor(const Tensor&, const OptTensor&, double);
using VectorsSig = std::tuple<OptTensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&, int64_t, double, bool);

struct Sweeps {
  c10::TypedOperatorHandle<ApplySig> apply = sweep<ApplySig>("bnff::apply");
  c10::TypedOperatorHandle<GradStatsSig> grad_stats = sweep<GradStatsSig>("bnff::grad_stats");
  c10::TypedOperatorHandle<InputGradSig> input_grad = sweep<InputGradSig>("bnff::input_grad");
  c10::TypedOperatorHandle<GradStatsXSig> grad_stats_x = sweep<GradStatsXSig>("bnff::grad_stats_x");
  c10::TypedOperatorHandle<InputGradXSig> input_grad_x = sweep<InputGradXSig>("bnff::input_grad_x");
  c10::TypedOperatorHandle<ScaleSig> scale = sweep<ScaleSig>("bnff::scale");
  c10::TypedOperatorHandle<VectorsSig> backward_vectors = sweep<VectorsSig>("bnff::backward_vectors");
  static const Sweeps& get() {
    static const Sweeps s;
    return s;
  }
};

// ---- the program --------------------------------------------------------------------------------
struct Term {
  int64_t src, n, mean, var, gamma, beta;
};
struct Conv {
  int64_t weight;
  bool bias;
  std::array<int64_t, 2> stride, padding, dilation;
  int64_t groups;
};
struct Step {
  int64_t kind, term, consumer;
  bool free_a, free_g;
};

template <class T, size_t K, class Make>
std::vector<T> decode(at::IntArrayRef ints, const char* what, Make make) {
  TORCH_CHECK(ints.size() % K == 0, "bnff group executor: ", what, " has ", ints.size(), " ints, not a multiple of ", K);
  std::vector<T> out;
  for (size_t i = 0; i < ints.size(); i += K) out.push_back(make(ints.data() + i));
  return out;
}

std::vector<Step> steps_of(at::IntArrayRef ints) {
  return decode<Step, 5>(ints, "steps", [](const int64_t* p) { return Step{p[0], p[1], p[2], p[3] != 0, p[4] != 0}; });
}

// A per-channel vector as the kernels read it: contiguous float32 (cpu.py's _f32).
Tensor f32(const Tensor& v) { return v.scalar_type() == at::kFloat && v.is_contiguous() ? v : v.to(at::kFloat).contiguous(); }
Tensor as_dtype(const Tensor& t, at::ScalarType d) { return t.scalar_type() == d ? t : t.to(d); }

// One call: the flat arguments and what the steps produce.
struct Call {
  std::vector<Tensor> flat;
  std::vector<Term> terms;
  int64_t r0, rn;
  std::vector<Conv> convs;
  int64_t act, layout;
  at::ScalarType out;
  std::vector<Tensor> f1;  // per term, F1 (bnff::scale)

  Call(const c10::List<OptTensor>& flat_in, at::IntArrayRef term_ints, at::IntArrayRef residuals,
       at::IntArrayRef conv_ints, int64_t act_, at::ArrayRef<double> eps, at::ScalarType out_, int64_t layout_)
      : act(act_), layout(layout_), out(out_) {
    for (size_t i = 0; i < flat_in.size(); ++i) {
      OptTensor t = flat_in.get(i);
      flat.push_back(t ? *t : Tensor());
    }
    terms = decode<Term, 6>(term_ints, "terms", [](const int64_t* p) { return Term{p[0], p[1], p[2], p[3], p[4], p[5]}; });
    TORCH_CHECK(residuals.size() == 2, "bnff group executor: residuals takes 2 ints");
    r0 = residuals[0], rn = residuals[1];
    convs = decode<Conv, 9>(conv_ints, "convs", [](const int64_t* p) {
      return Conv{p[0], p[1] != 0, {p[2], p[3]}, {p[4], p[5]}, {p[6], p[7]}, p[8]};
    });
    TORCH_CHECK(eps.size() == terms.size(), "bnff group executor: one eps per BN term");
    for (size_t k = 0; k < terms.size(); ++k) {
      const Tensor& gamma = flat[terms[k].gamma];
      f1.push_back(Sweeps::get().scale.call(flat[terms[k].var].contiguous(),
                                            gamma.defined() ? OptTensor(gamma) : std::nullopt, eps[k]));
    }
  }

  std::vector<Tensor> sources(const Term& t) const { return {flat.begin() + t.src, flat.begin() + t.src + t.n}; }
  Tensor mean(const Term& t) const { return f32(flat[t.mean]); }
  Tensor beta(size_t k) const {
    const Tensor& b = flat[terms[k].beta];
    return b.defined() ? f32(b) : at::zeros_like(f1[k]);
  }
  // g_a (or dy, a) dense in the call's layout, copied only if it is not (cpu.py's _like_layout)
  Tensor dense(const Tensor& t) const {
    const auto fmt = layout == BNFF_LAYOUT_NHWC ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
  }

  // a = act(sum_k BN_k(x_k) + sum_j r_j): the apply sweep (step "apply", "recompute")
  Tensor applied() const {
    std::vector<Tensor> srcs, means, betas, res(flat.begin() + r0, flat.begin() + r0 + rn);
    std::vector<int64_t> ns;
    for (size_t k = 0; k < terms.size(); ++k) {
      for (const Tensor& s : sources(terms[k])) srcs.push_back(s);
      ns.push_back(terms[k].n);
      means.push_back(mean(terms[k]));
      betas.push_back(beta(k));
    }
    return Sweeps::get().apply.call(srcs, ns, means, f1, betas, res, act, out, layout);
  }
};

// The consumers' convolutions run as the Python consumer runs them (consumers.ConvConsumer), with
// autocast off: fused._executor sends only calls whose inputs are in the convolutions' dtype already.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

std::vector<Tensor> group_forward(const c10::List<OptTensor>& flat, at::IntArrayRef terms, at::IntArrayRef residuals,
                                  at::IntArrayRef convs, at::IntArrayRef steps, int64_t act, at::ArrayRef<double> eps,
                                  at::ScalarType out_dtype, int64_t layout) {
  NoAutocast no_autocast;
  Call c(flat, terms, residuals, convs, act, eps, out_dtype, layout);
  std::vector<Tensor> result{Tensor()};  // a, then each consumer's output
  for (const Step& s : steps_of(steps)) {
    if (s.kind == BNFF_STEP_APPLY) {
      result[0] = c.applied();
    } else if (s.kind == BNFF_STEP_CONSUME) {
      const Conv& v = c.convs.at(s.consumer);
      const Tensor& bias = c.flat[v.weight + 1];
      result.push_back(at::convolution(result[0], c.flat[v.weight], v.bias ? OptTensor(bias) : std::nullopt, v.stride,
                                       v.padding, v.dilation, false, {0, 0}, v.groups));
    } else {
      TORCH_CHECK(false, "bnff group executor: step kind ", s.kind, " is not a forward step it runs");
    }
  }
  return result;
}

// The backward of the group: its plan's backward steps. Returns a gradient (or None) per flat argument
// (Tensor?[]: a Python dispatch mode, such as torch's FlopCounterMode, hands the result back through
// Python, where an undefined tensor in a Tensor[] does not convert).
c10::List<OptTensor> group_backward(const c10::List<OptTensor>& flat, const OptTensor& a_kept,
                                   const c10::List<OptTensor>& grad_outs, at::IntArrayRef terms,
                                   at::IntArrayRef residuals, at::IntArrayRef convs, at::IntArrayRef steps,
                                   int64_t act, at::ArrayRef<double> eps, at::IntArrayRef batch, at::IntArrayRef needs,
                                   bool per_consumer, at::ScalarType out_dtype, int64_t layout) {
  NoAutocast no_autocast;
  const Sweeps& sw = Sweeps::get();
  Call c(flat, terms, residuals, convs, act, eps, out_dtype, layout);
  const size_t K = c.terms.size();
  TORCH_CHECK(needs.size() == c.flat.size() && batch.size() == K, "bnff group executor: needs and batch do not fit");
  std::vector<Tensor> grads(c.flat.size()), dgrads(c.convs.size()), s1(K), s2c(K), b(K), dgamma(K), dbeta(K);
  Tensor a = a_kept ? *a_kept : Tensor(), g, dy;
  auto grad_out = [&](size_t i) -> Tensor {
    OptTensor t = grad_outs.get(i);
    return t ? *t : Tensor();
  };
  if (!per_consumer) g = grad_out(0);  // made dense by the caller or by a grad_layout step
  auto sums_known = [&](size_t k) {
    const Tensor& x0 = c.flat[c.terms[k].src];
    auto [bk, dg, db] = sw.backward_vectors.call(c.flat[c.terms[k].var].contiguous(), c.f1[k], s1[k], s2c[k], s2c[k],
                                                 x0.numel() / x0.size(1), eps[k], batch[k] != 0);
    b[k] = bk ? *bk : Tensor();
    dgamma[k] = dg, dbeta[k] = db;
  };
  auto any_needed = [&](const Term& t) {
    for (int64_t i = t.src; i < t.src + t.n; ++i)
      if (needs[i]) return true;
    return false;
  };
  auto opt = [](const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; };
  for (const Step& s : steps_of(steps)) {
    switch (s.kind) {
      case BNFF_STEP_RECOMPUTE:
        a = c.applied();
        break;
      case BNFF_STEP_GRAD_LAYOUT:
        g = c.dense(g);
        break;
      case BNFF_STEP_CONSUMER_BACKWARD: {
        Tensor go = grad_out(s.consumer);
        if (!go.defined()) break;
        const Conv& v = c.convs.at(s.consumer);
        const Tensor &w = c.flat[v.weight], &bias = c.flat[v.weight + 1];
        auto [ga, gw, gb] = at::convolution_backward(
            as_dtype(go, w.scalar_type()), a, w,
            v.bias ? std::optional<at::IntArrayRef>(at::IntArrayRef(w.sizes().data(), 1)) : std::nullopt, v.stride,
            v.padding, v.dilation, false, {0, 0}, v.groups, {true, needs[v.weight] != 0, v.bias && needs[v.weight + 1] != 0});
        grads[v.weight] = gw.defined() ? as_dtype(gw, w.scalar_type()) : gw;
        grads[v.weight + 1] = gb.defined() ? as_dtype(gb, bias.scalar_type()) : gb;
        if (!g.defined())
          g = ga;
        else
          dgrads[s.consumer] = ga;
        break;
      }
      case BNFF_STEP_GRAD_ADD:
        if (dgrads.at(s.consumer).defined()) {
          g = g.add(dgrads[s.consumer]);
          dgrads[s.consumer] = Tensor();
        }
        break;
      case BNFF_STEP_GRAD_STATS_X: {
        const size_t k = s.term;
        g = c.dense(g);
        std::tie(s1[k], s2c[k]) = sw.grad_stats_x.call(g, c.sources(c.terms[k]), c.mean(c.terms[k]), c.f1[k], c.beta(k),
                                                      act, out_dtype, layout);
        sums_known(k);
        break;
      }
      case BNFF_STEP_GRAD_STATS: {
        // the derivative reads a, or z recomputed from the terms and the shortcuts (the act argument's
        // BNFF_ACT_FROM_Z bit, bnff_sweeps.h)
        const bool at_z = (act & BNFF_ACT_FROM_Z) != 0, reads_a = act != BNFF_ACT_NONE && !at_z;
        std::vector<Tensor> srcs, means, f1s, betas, res;
        std::vector<int64_t> ns;
        for (size_t k = 0; k < K; ++k) {
          const Term& t = c.terms[k];
          for (const Tensor& x : c.sources(t)) srcs.push_back(x);
          ns.push_back(t.n);
          means.push_back(c.mean(t));
          if (at_z) f1s.push_back(c.f1[k]), betas.push_back(c.beta(k));
        }
        if (at_z) res.assign(c.flat.begin() + c.r0, c.flat.begin() + c.r0 + c.rn);
        g = c.dense(g);
        std::vector<Tensor> s1s, s2cs;
        std::tie(dy, s1s, s2cs) = sw.grad_stats.call(g, reads_a ? opt(c.dense(a)) : std::nullopt, act, srcs, ns, means,
                                                    f1s, betas, res, layout);
        for (size_t k = 0; k < K; ++k) {
          s1[k] = s1s[k], s2c[k] = s2cs[k];
          sums_known(k);
        }
        break;
      }
      case BNFF_STEP_INPUT_GRAD:
      case BNFF_STEP_INPUT_GRAD_X: {
        const Term& t = c.terms[s.term];
        if (!any_needed(t)) break;
        std::vector<Tensor> dx =
            s.kind == BNFF_STEP_INPUT_GRAD
                ? sw.input_grad.call(c.dense(dy), c.sources(t), c.mean(t), c.f1[s.term], opt(b[s.term]), s1[s.term],
                                     layout)
                : sw.input_grad_x.call(c.dense(g), c.sources(t), c.mean(t), c.f1[s.term], c.beta(s.term), act,
                                       out_dtype, opt(b[s.term]), s1[s.term], layout);
        for (int64_t j = 0; j < t.n; ++j) grads[t.src + j] = dx[j];
        break;
      }
      default:
        TORCH_CHECK(false, "bnff group executor: step kind ", s.kind, " is not a backward step it runs");
    }
    if (s.free_a) a = Tensor();
    if (s.free_g) g = Tensor();
  }
  for (size_t k = 0; k < K; ++k) {
    const Term& t = c.terms[k];
    if (needs[t.gamma]) grads[t.gamma] = as_dtype(dgamma[k], c.flat[t.gamma].scalar_type());
    if (needs[t.beta]) grads[t.beta] = as_dtype(dbeta[k], c.flat[t.beta].scalar_type());
  }
  for (int64_t j = c.r0; j < c.r0 + c.rn; ++j)
    if (needs[j]) grads[j] = as_dtype(dy, out_dtype);
  c10::List<OptTensor> out;
  for (const Tensor& t : grads) out.push_back(t.defined() ? OptTensor(t) : std::nullopt);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bnff, m) {
  m.def("group_forward(Tensor?[] flat, int[] terms, int[] residuals, int[] convs, int[] steps, int act, "
        "float[] eps, ScalarType out_dtype, int layout) -> Tensor[]");
  m.def("group_backward(Tensor?[] flat, Tensor? a, Tensor?[] grad_outs, int[] terms, int[] residuals, int[] convs, "
        "int[] steps, int act, float[] eps, int[] batch, int[] needs, bool per_consumer, ScalarType out_dtype, "
        "int layout) -> Tensor?[]");
}

TORCH_LIBRARY_IMPL(bnff, CPU, m) {
  m.impl("group_forward", &group_forward);
  m.impl("group_backward", &group_backward);
}
