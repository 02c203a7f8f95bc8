// kdplug::kd_loss_fwd_eager: kd_loss_fwd's loss with its autograd in C++, for eager calls on the
// CPU with a reduced loss (kdplug/_dense_op.py: _fast_path; kdplug/_op_support.py: call_fused).
// The Python autograd.Function it replaces there costs most of a small batch's step: measured at
// 8192 x 10, forward+backward after other work has evicted the caches, the kernel alone took
// ~0.16 ms and the Python node another ~0.14 ms. torch.compile traces kd_loss_fwd and its
// registered autograd instead, whose numbers this matches (same kernel, same scaling of the
// gradient); this op passes opcheck too (tests/test_eager_autograd.py).
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

namespace kdplug {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, double, int64_t, double,
    const c10::optional<at::Tensor>&, double, int64_t, const c10::optional<at::Tensor>&,
    int64_t, const c10::optional<at::Tensor>&, bool, bool);

const c10::TypedOperatorHandle<FwdSignature>& fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("kdplug::kd_loss_fwd", "")
                             .typed<FwdSignature>();
  return op;
}

// The forward writes d(loss)/d(logits) in the same pass; backward only scales it by the incoming
// gradient, and with a gradient of exactly 1 (loss.backward() on the loss itself) hands the
// tensor over as it is: autograd then keeps it as .grad without a copy.
struct KdLossEager : public torch::autograd::Function<KdLossEager> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student,
                            const at::Tensor& teacher, double temperature, int64_t divergence,
                            double beta, const c10::optional<at::Tensor>& labels, double alpha,
                            int64_t ignore_index, const c10::optional<at::Tensor>& mask,
                            int64_t reduction, const c10::optional<at::Tensor>& scales,
                            bool student_grad, bool teacher_grad) {
    // Below autograd: kd_loss_fwd's own (Python) autograd kernel would only redispatch.
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, grad_student, grad_teacher] =
        fwd_op().call(student, teacher, temperature, divergence, beta, labels, alpha,
                      ignore_index, mask, reduction, scales, student_grad, teacher_grad);
    // Saved variables, which the engine drops as soon as backward has run (unless the graph is
    // retained): the gradient backward hands on is then the only reference to its tensor.
    ctx->save_for_backward({grad_student, grad_teacher});
    ctx->saved_data["student_grad"] = student_grad;
    ctx->saved_data["teacher_grad"] = teacher_grad;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad_loss = grad_outputs[0];
    variable_list grads(13);
    if (!grad_loss.defined()) return grads;
    // A read of a real CPU scalar waits for nothing; a traced one (a fake or functional tensor
    // under torch.compile or opcheck) has no value to read: multiplied, which fuses there.
    const c10::DispatchKeySet traced({c10::DispatchKey::Python, c10::DispatchKey::Functionalize});
    // (the loss, and so its gradient, is a scalar: the op reduces it)
    const bool unit = grad_loss.is_cpu() && !grad_loss.key_set().has_any(traced) &&
                      grad_loss.item<double>() == 1.0;
    auto scaled = [&](const at::Tensor& g, const char* wanted) {
      if (!ctx->saved_data[wanted].toBool()) return at::Tensor();
      if (unit) return g;
      return g.mul(grad_loss).to(g.scalar_type());
    };
    grads[0] = scaled(saved[0], "student_grad");
    grads[1] = scaled(saved[1], "teacher_grad");
    return grads;
  }
};

at::Tensor kd_loss_fwd_eager(const at::Tensor& student, const at::Tensor& teacher,
                             double temperature, int64_t divergence, double beta,
                             const c10::optional<at::Tensor>& labels, double alpha,
                             int64_t ignore_index, const c10::optional<at::Tensor>& mask,
                             int64_t reduction, const c10::optional<at::Tensor>& scales,
                             bool student_grad, bool teacher_grad) {
  TORCH_CHECK(reduction != 0, "kd_loss_fwd_eager: expected a reduced loss (sum or batchmean); "
              "per-row losses go through kd_loss_fwd's registered autograd");
  return KdLossEager::apply(student, teacher, temperature, divergence, beta, labels, alpha,
                            ignore_index, mask, reduction, scales, student_grad, teacher_grad);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdplug, m) {
  // kd_loss_fwd's arguments; -> its loss, differentiable (the gradients it was asked for).
  m.def("kd_loss_fwd_eager(Tensor student, Tensor teacher, float temperature, int divergence, "
        "float beta, Tensor? labels, float alpha, int ignore_index, Tensor? mask, int reduction, "
        "Tensor? scales, bool student_grad, bool teacher_grad) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdplug, CompositeImplicitAutograd, m) {
  m.impl("kd_loss_fwd_eager", &kd_loss_fwd_eager);
}

}  // namespace kdplug
