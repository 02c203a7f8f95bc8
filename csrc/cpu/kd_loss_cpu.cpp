// CPU implementation of kdplug::kd_loss_fwd and kd_loss_fwd_portable: checks, outputs, and the
// choice of kernel (kd_cpu.h). Small calls are dominated by fixed costs, so nothing here runs a
// torch op it can avoid: the reduction's factors and the reduced loss are computed in place.
#include <algorithm>
#include <tuple>

#include "cpu/cpu_common.h"
#include "cpu/kd_cpu.h"
#include "kd_loss.h"

namespace kdplug {
namespace {

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
  check_labels_host("kd_loss_fwd", rows, cols, o);
  double kd_scale, ce_scale;
  term_scales_host(rows, o, &kd_scale, &ce_scale);

  at::Tensor loss_rows = at::empty({rows}, student.options().dtype(acc_dtype(student)));
  at::Tensor grad_student =
      student_grad ? cpu::grad_buffer_cache().empty_like(student) : no_grad_output(student);
  at::Tensor grad_teacher = teacher_grad ? at::empty_like(teacher, at::MemoryFormat::Contiguous)
                                         : no_grad_output(teacher);
  cpu::DenseProblem p = cpu::dense_problem(student, o, kd_scale, ce_scale);
  p.teacher = teacher.data_ptr();
  p.grad_student = student_grad ? grad_student.data_ptr() : nullptr;
  p.grad_teacher = teacher_grad ? grad_teacher.data_ptr() : nullptr;
  p.loss_rows = loss_rows.data_ptr();

  if (kPortable || p.dtype == at::kDouble) {
    cpu::dense_portable(p);
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

TORCH_LIBRARY_IMPL(kdplug, CPU, m) {
  m.impl("kd_loss_fwd", &kd_loss_fwd_cpu<false>);
  m.impl("kd_loss_fwd_portable", &kd_loss_fwd_cpu<true>);
}

}  // namespace kdplug
