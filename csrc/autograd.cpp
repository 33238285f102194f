// Autograd of the kdkernels operators, in C++ (one Autograd dispatch-key kernel per op, as
// torchvision does for its ops). A Python autograd formula costs a Python frame on the way in
// and another on the way back; here both directions stay in C++, so a fused loss costs the host
// about what one aten loss does. Every op returns the loss first and auxiliary tensors after it
// (saved for the backward, never differentiated); the teacher never receives a gradient.
//
// The forward runs the op below autograd (the CPU or CUDA kernel); the backward either scales a
// unit gradient that the forward wrote (sgm, pixel_kl, structure, logit_attention) or calls the
// op's backward operator. Gradients are not materialised: an unused loss costs nothing.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace kdk {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Pair = std::tuple<at::Tensor, at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The typed handle of kdkernels::<name>, looked up once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The forward kernel below autograd, with the autograd bookkeeping of outputs 1.. done here.
template <typename Signature, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Signature>& handle, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below;
  return handle.call(std::forward<Args>(args)...);
}

void prepare(AutogradContext* ctx, const at::Tensor& aux) {
  ctx->set_materialize_grads(false);
  ctx->mark_non_differentiable({aux});
}

void prepare(AutogradContext* ctx, const at::Tensor& aux1, const at::Tensor& aux2) {
  ctx->set_materialize_grads(false);
  ctx->mark_non_differentiable({aux1, aux2});
}

// ---------------------------------------------------------------------------------------------
// Ops whose forward writes the unit gradient d loss / d student: the backward is one scale by
// the upstream gradient, written in the student's dtype (the unit may be in the accumulation
// dtype) with the unit's memory format.

bool plain_cpu(const at::Tensor& t) {
  return t.is_cpu() && !t.key_set().has_any(c10::DispatchKeySet(
                           {c10::DispatchKey::Python, c10::DispatchKey::Functionalize, c10::DispatchKey::PythonTLSSnapshot}));
}

variable_list unit_backward(AutogradContext* ctx, const variable_list& grads, size_t n_inputs, const char* op) {
  variable_list out(n_inputs);
  if (!grads[0].defined()) return out;
  TORCH_CHECK(ctx->saved_data["need_grad"].toBool(), "kdkernels::", op,
              " ran with need_grad=False, so it kept no gradient; call it with need_grad=True to differentiate it");
  const at::Tensor unit = ctx->get_saved_variables()[0];
  const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
  // On the CPU a unit upstream gradient (loss.backward()) is read for free and the unit gradient
  // is the answer: no pass over it. (Autograd copies it before accumulating in place, since the
  // saved variable still refers to it.) On CUDA reading it would synchronise the host; under
  // tracing (fake or functional tensors, a dispatch mode) it would be a data-dependent read.
  if (unit.scalar_type() == dtype && plain_cpu(unit) && plain_cpu(grads[0]) && grads[0].numel() == 1 &&
      !c10::impl::TorchDispatchModeTLS::any_modes_set() && grads[0].item<double>() == 1.0) {
    out[0] = unit;
    return out;
  }
  at::Tensor grad = at::empty_like(unit, unit.options().dtype(dtype));
  out[0] = at::mul_out(grad, unit, grads[0]);
  return out;
}

void save_unit(AutogradContext* ctx, const Pair& result, const at::Tensor& student, bool need_grad) {
  prepare(ctx, std::get<1>(result));
  ctx->saved_data["dtype"] = static_cast<int64_t>(student.scalar_type());
  ctx->saved_data["need_grad"] = need_grad;
  ctx->save_for_backward({std::get<1>(result)});
}

struct SgmFunction : torch::autograd::Function<SgmFunction> {
  using Sig = Pair(const at::Tensor&, const at::Tensor&, c10::string_view, bool);
  static variable_list forward(AutogradContext* ctx, const at::Tensor& ps, const at::Tensor& pt,
                               const std::string& distance, bool need_grad) {
    static const auto handle = op_handle<Sig>("kdkernels::sgm");
    Pair r = call_below_autograd(handle, ps, pt, distance, need_grad);
    save_unit(ctx, r, ps, need_grad);
    return {std::get<0>(r), std::get<1>(r)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return unit_backward(ctx, grads, 4, "sgm");
  }
};

Pair sgm_autograd(const at::Tensor& ps, const at::Tensor& pt, c10::string_view distance, bool need_grad) {
  auto r = SgmFunction::apply(ps, pt.detach(), std::string(distance), need_grad);
  return {r[0], r[1]};
}

struct PixelKlFunction : torch::autograd::Function<PixelKlFunction> {
  using Sig = Pair(const at::Tensor&, const at::Tensor&, double, const c10::optional<at::Tensor>&, bool);
  static variable_list forward(AutogradContext* ctx, const at::Tensor& zs, const at::Tensor& zt, double temperature,
                               const c10::optional<at::Tensor>& mask, bool need_grad) {
    static const auto handle = op_handle<Sig>("kdkernels::pixel_kl");
    Pair r = call_below_autograd(handle, zs, zt, temperature, mask, need_grad);
    save_unit(ctx, r, zs, need_grad);
    return {std::get<0>(r), std::get<1>(r)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return unit_backward(ctx, grads, 5, "pixel_kl");
  }
};

Pair pixel_kl_autograd(const at::Tensor& zs, const at::Tensor& zt, double temperature,
                       const c10::optional<at::Tensor>& mask, bool need_grad) {
  auto r = PixelKlFunction::apply(zs, zt.detach(), temperature, mask, need_grad);
  return {r[0], r[1]};
}

struct StructureFunction : torch::autograd::Function<StructureFunction> {
  using Sig = Pair(const at::Tensor&, const at::Tensor&, bool);
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& mask,
                               bool need_grad) {
    static const auto handle = op_handle<Sig>("kdkernels::structure");
    Pair r = call_below_autograd(handle, logits, mask, need_grad);
    save_unit(ctx, r, logits, need_grad);
    return {std::get<0>(r), std::get<1>(r)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return unit_backward(ctx, grads, 3, "structure");
  }
};

Pair structure_autograd(const at::Tensor& logits, const at::Tensor& mask, bool need_grad) {
  auto r = StructureFunction::apply(logits, mask.detach(), need_grad);
  return {r[0], r[1]};
}

struct LogitAttentionFunction : torch::autograd::Function<LogitAttentionFunction> {
  using Sig = Pair(const at::Tensor&, const at::Tensor&, double, bool);
  static variable_list forward(AutogradContext* ctx, const at::Tensor& ps, const at::Tensor& pt, double tau,
                               bool need_grad) {
    static const auto handle = op_handle<Sig>("kdkernels::logit_attention");
    Pair r = call_below_autograd(handle, ps, pt, tau, need_grad);
    save_unit(ctx, r, ps, need_grad);
    return {std::get<0>(r), std::get<1>(r)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return unit_backward(ctx, grads, 4, "logit_attention");
  }
};

Pair logit_attention_autograd(const at::Tensor& ps, const at::Tensor& pt, double tau, bool need_grad) {
  auto r = LogitAttentionFunction::apply(ps, pt.detach(), tau, need_grad);
  return {r[0], r[1]};
}

// ---------------------------------------------------------------------------------------------
// Ops with a backward operator: the forward saves what that operator reads.

struct AttentionTransferFunction : torch::autograd::Function<AttentionTransferFunction> {
  using Sig = Pair(const at::Tensor&, const at::Tensor&, double, c10::string_view);
  using BwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double);
  static variable_list forward(AutogradContext* ctx, const at::Tensor& fs, const at::Tensor& ft, double p,
                               const std::string& reduction) {
    static const auto handle = op_handle<Sig>("kdkernels::attention_transfer");
    Pair r = call_below_autograd(handle, fs, ft, p, reduction);
    prepare(ctx, std::get<1>(r));
    ctx->saved_data["p"] = p;
    ctx->save_for_backward({fs, std::get<1>(r)});
    return {std::get<0>(r), std::get<1>(r)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto handle = op_handle<BwdSig>("kdkernels::attention_transfer_backward");
    variable_list out(4);
    if (!grads[0].defined()) return out;
    const auto saved = ctx->get_saved_variables();
    out[0] = handle.call(grads[0], saved[0], saved[1], ctx->saved_data["p"].toDouble());
    return out;
  }
};

Pair attention_transfer_autograd(const at::Tensor& fs, const at::Tensor& ft, double p, c10::string_view reduction) {
  auto r = AttentionTransferFunction::apply(fs, ft.detach(), p, std::string(reduction));
  return {r[0], r[1]};
}

struct ChannelRelationFunction : torch::autograd::Function<ChannelRelationFunction> {
  using Sig = Triple(const at::Tensor&, const at::Tensor&, c10::string_view, c10::string_view, double);
  using BwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            c10::string_view, double);
  static variable_list forward(AutogradContext* ctx, const at::Tensor& fs, const at::Tensor& ft,
                               const std::string& normalize, const std::string& distance, double tau) {
    static const auto handle = op_handle<Sig>("kdkernels::channel_relation");
    Triple r = call_below_autograd(handle, fs, ft, normalize, distance, tau);
    prepare(ctx, std::get<1>(r), std::get<2>(r));
    ctx->saved_data["normalize"] = normalize;
    ctx->saved_data["tau"] = tau;
    ctx->save_for_backward({fs, std::get<1>(r), std::get<2>(r)});
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto handle = op_handle<BwdSig>("kdkernels::channel_relation_backward");
    variable_list out(5);
    if (!grads[0].defined()) return out;
    const auto saved = ctx->get_saved_variables();
    out[0] = handle.call(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["normalize"].toStringRef(),
                         ctx->saved_data["tau"].toDouble());
    return out;
  }
};

Triple channel_relation_autograd(const at::Tensor& fs, const at::Tensor& ft, c10::string_view normalize,
                                 c10::string_view distance, double tau) {
  auto r = ChannelRelationFunction::apply(fs, ft.detach(), std::string(normalize), std::string(distance), tau);
  return {r[0], r[1], r[2]};
}

struct PixelRelationMseFunction : torch::autograd::Function<PixelRelationMseFunction> {
  using Sig = Triple(const at::Tensor&, const at::Tensor&);
  using BwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&);
  static variable_list forward(AutogradContext* ctx, const at::Tensor& fs, const at::Tensor& ft) {
    static const auto handle = op_handle<Sig>("kdkernels::pixel_relation_mse");
    Triple r = call_below_autograd(handle, fs, ft);
    prepare(ctx, std::get<1>(r), std::get<2>(r));
    ctx->save_for_backward({fs, ft, std::get<1>(r), std::get<2>(r)});
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto handle = op_handle<BwdSig>("kdkernels::pixel_relation_mse_backward");
    variable_list out(2);
    if (!grads[0].defined()) return out;
    const auto saved = ctx->get_saved_variables();
    out[0] = handle.call(grads[0], saved[0], saved[1], saved[2], saved[3]);
    return out;
  }
};

Triple pixel_relation_mse_autograd(const at::Tensor& fs, const at::Tensor& ft) {
  auto r = PixelRelationMseFunction::apply(fs, ft.detach());
  return {r[0], r[1], r[2]};
}

struct PixelRelationKlFunction : torch::autograd::Function<PixelRelationKlFunction> {
  using Sig = Triple(const at::Tensor&, const at::Tensor&, double);
  using BwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, double);
  static variable_list forward(AutogradContext* ctx, const at::Tensor& fs, const at::Tensor& ft, double tau) {
    static const auto handle = op_handle<Sig>("kdkernels::pixel_relation_kl");
    Triple r = call_below_autograd(handle, fs, ft, tau);
    prepare(ctx, std::get<1>(r), std::get<2>(r));
    ctx->saved_data["tau"] = tau;
    ctx->save_for_backward({fs, ft, std::get<1>(r), std::get<2>(r)});
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto handle = op_handle<BwdSig>("kdkernels::pixel_relation_kl_backward");
    variable_list out(3);
    if (!grads[0].defined()) return out;
    const auto saved = ctx->get_saved_variables();
    out[0] = handle.call(grads[0], saved[0], saved[1], saved[2], saved[3], ctx->saved_data["tau"].toDouble());
    return out;
  }
};

Triple pixel_relation_kl_autograd(const at::Tensor& fs, const at::Tensor& ft, double tau) {
  auto r = PixelRelationKlFunction::apply(fs, ft.detach(), tau);
  return {r[0], r[1], r[2]};
}

struct ChannelWiseKlFunction : torch::autograd::Function<ChannelWiseKlFunction> {
  using Sig = Pair(const at::Tensor&, const at::Tensor&, double);
  using BwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double);
  static variable_list forward(AutogradContext* ctx, const at::Tensor& fs, const at::Tensor& ft, double tau) {
    static const auto handle = op_handle<Sig>("kdkernels::channel_wise_kl");
    Pair r = call_below_autograd(handle, fs, ft, tau);
    prepare(ctx, std::get<1>(r));
    ctx->saved_data["tau"] = tau;
    ctx->save_for_backward({fs, ft, std::get<1>(r)});
    return {std::get<0>(r), std::get<1>(r)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto handle = op_handle<BwdSig>("kdkernels::channel_wise_kl_backward");
    variable_list out(3);
    if (!grads[0].defined()) return out;
    const auto saved = ctx->get_saved_variables();
    out[0] = handle.call(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["tau"].toDouble());
    return out;
  }
};

Pair channel_wise_kl_autograd(const at::Tensor& fs, const at::Tensor& ft, double tau) {
  auto r = ChannelWiseKlFunction::apply(fs, ft.detach(), tau);
  return {r[0], r[1]};
}

}  // namespace
}  // namespace kdk

TORCH_LIBRARY_IMPL(kdkernels, Autograd, m) {
  m.impl("attention_transfer", &kdk::attention_transfer_autograd);
  m.impl("channel_relation", &kdk::channel_relation_autograd);
  m.impl("pixel_relation_mse", &kdk::pixel_relation_mse_autograd);
  m.impl("pixel_relation_kl", &kdk::pixel_relation_kl_autograd);
  m.impl("channel_wise_kl", &kdk::channel_wise_kl_autograd);
  m.impl("structure", &kdk::structure_autograd);
  m.impl("pixel_kl", &kdk::pixel_kl_autograd);
  m.impl("sgm", &kdk::sgm_autograd);
  m.impl("logit_attention", &kdk::logit_attention_autograd);
}
