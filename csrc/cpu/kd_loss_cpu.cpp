// CPU kernels of kdplug::kd_loss_fwd and kd_loss_fwd_portable (registered per capability): checks, outputs, and the
// choice of kernel (kd_cpu.h). Small calls are dominated by fixed costs, so nothing here runs a
// torch op it can avoid: the reduction's factors and the reduced loss are computed in place.
#include <algorithm>
#include <tuple>

#include "cpu/cpu_common.h"
#include "cpu/kd_cpu.h"
#include "cpu/kd_entry.h"
#include "cpu/kernels.h"
#include "kd_loss.h"

KD_NAMESPACE_BEGIN
namespace {

// The portable kernel computes in float32 (float64 for float64), like the GPU, which converts
// each 16-bit element on load and rounds each gradient on store: 16-bit inputs go in as float32.
void run_portable(cpu::DenseProblem p, const at::Tensor& student, const at::Tensor& teacher,
                  at::Tensor& grad_student, at::Tensor& grad_teacher) {
  if (p.dtype == at::kFloat || p.dtype == at::kDouble) {
    cpu::dense_portable(p);
    return;
  }
  const at::Tensor s = student.to(at::kFloat), t = teacher.to(at::kFloat);
  at::Tensor gs = p.grad_student ? at::empty_like(s) : grad_student;
  at::Tensor gt = p.grad_teacher ? at::empty_like(t) : grad_teacher;
  p.dtype = at::kFloat;
  p.student = s.data_ptr();
  p.teacher = t.data_ptr();
  if (p.grad_student) p.grad_student = gs.data_ptr();
  if (p.grad_teacher) p.grad_teacher = gt.data_ptr();
  cpu::dense_portable(p);
  if (p.grad_student) grad_student.copy_(gs);
  if (p.grad_teacher) grad_teacher.copy_(gt);
}

template <bool kPortable>
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cpu(
    const at::Tensor& student_in, const at::Tensor& teacher_in, double temperature,
    int64_t divergence, double beta, const c10::optional<at::Tensor>& labels, double alpha,
    int64_t ignore_index, const c10::optional<at::Tensor>& mask, int64_t reduction,
    const c10::optional<at::Tensor>& scales, bool student_grad, bool teacher_grad) {
  KdLossOptions o{temperature, divergence, beta, labels, alpha, ignore_index,
                  mask, reduction, scales, student_grad};
  check_kd_inputs(student_in, teacher_in, o);
  TORCH_CHECK(student_in.device().is_cpu(), "kd_loss_fwd (CPU): expected CPU tensors");
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const int64_t rows = student.size(0), cols = student.size(1);
  check_labels_host(kFaultOpKdLoss, rows, cols, o);
  double kd_scale, ce_scale;
  term_scales_host(rows, o, &kd_scale, &ce_scale);

  at::Tensor loss_rows = at::empty({rows}, student.options().dtype(acc_dtype(student)));
  at::Tensor grad_student =
      student_grad ? cpu::grad_buffer_like(student) : no_grad_output(student);
  at::Tensor grad_teacher = teacher_grad ? at::empty_like(teacher, at::MemoryFormat::Contiguous)
                                         : no_grad_output(teacher);
  cpu::DenseProblem p = cpu::dense_problem(student, o, kd_scale, ce_scale);
  p.teacher = teacher.data_ptr();
  p.grad_student = student_grad ? grad_student.data_ptr() : nullptr;
  p.grad_teacher = teacher_grad ? grad_teacher.data_ptr() : nullptr;
  p.loss_rows = loss_rows.data_ptr();

  if (kPortable || p.dtype == at::kDouble) {
    run_portable(p, student, teacher, grad_student, grad_teacher);
  } else if (cols <= cpu::kSmallClasses) {
    cpu::dense_small(p);
  } else {
    cpu::dense_vector(p);
  }
  at::Tensor loss = p.dtype == at::kDouble ? cpu::reduce_rows_host<double>(loss_rows, reduction)
                                           : cpu::reduce_rows_host<float>(loss_rows, reduction);
  return {loss, grad_student, grad_teacher};
}

}  // namespace

KD_REGISTER_CPU_KERNEL(kd_loss_fwd_kernel, &kd_loss_fwd_cpu<false>)
KD_REGISTER_CPU_KERNEL(kd_loss_fwd_portable_kernel, &kd_loss_fwd_cpu<true>)

KD_NAMESPACE_END
