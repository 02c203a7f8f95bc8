// Schema of kdplug's fused KD loss. Kernels live per device in cpu/ and cuda/; autograd, the fake
// (meta) kernel, input validation and the pure-PyTorch fallback live in kdplug/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "grad_buffers.h"
#include "kernel_faults.h"

// Importing kdplug._C loads this library and so registers the ops below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(kdplug, m) {
  // Rows of student/teacher logits [rows, classes] -> (loss, grad_student, grad_teacher).
  // Per row, with the divergence D of kd_math.h (0 kl, 1 reverse_kl, 2 jsd, 3 tvd, 4 skew_kl,
  // 5 skew_reverse_kl; beta for jsd and the skews):
  //   loss_row = alpha * kd_scale * T^2 * D + (1 - alpha) * ce_scale * CE(student, label)
  // where CE is at T = 1 and counts only when labels are given and label != ignore_index
  // (without labels alpha must be 1). scales = (kd_scale, ce_scale), float32 [2] (float64 for
  // float64 inputs); when None they come from the reduction: (1, 1) for 0 (none) and 1 (sum),
  // (1/counted rows, 1/counted labelled rows) for 2 (batchmean). A caller summing chunks of one
  // batch passes the batch's scales. loss: [rows] for none, else the sum of the rows (float32, or
  // float64 for float64 inputs). grad_student = d loss / d student (for none: of each row's loss),
  // written in the same pass when student_grad, else an empty tensor; grad_teacher likewise when
  // teacher_grad. Rows where mask is false have loss 0 and gradient 0, count for nothing and are
  // never read.
  m.def("kd_loss_fwd(Tensor student, Tensor teacher, float temperature, int divergence, "
        "float beta, Tensor? labels, float alpha, int ignore_index, Tensor? mask, int reduction, "
        "Tensor? scales, bool student_grad, bool teacher_grad) -> (Tensor, Tensor, Tensor)");
  // The same contract, computed row by row with exactly the scalar arithmetic of kd_math.h that
  // the CUDA kernel runs; CPU only, for tests.
  m.def("kd_loss_fwd_portable(Tensor student, Tensor teacher, float temperature, int divergence, "
        "float beta, Tensor? labels, float alpha, int ignore_index, Tensor? mask, int reduction, "
        "Tensor? scales, bool student_grad, bool teacher_grad) -> (Tensor, Tensor, Tensor)");
  // A teacher known on k classes per row: indices int64 [rows, k] (distinct within a row) and
  // values float32 [rows, k], its log-probabilities at T = 1. rest_bucket keeps the teacher's mass
  // outside the top-k as one class; otherwise the top-k is renormalized (see kd_math.h). The
  // other arguments and the loss as for kd_loss_fwd; -> (loss, grad_student).
  m.def("kd_loss_topk_fwd(Tensor student, Tensor indices, Tensor values, float temperature, "
        "int divergence, float beta, Tensor? labels, float alpha, int ignore_index, Tensor? mask, "
        "int reduction, bool rest_bucket, Tensor? scales, bool student_grad) -> (Tensor, Tensor)");
  // Frees the large CPU gradient buffer the CPU ops keep for reuse (grad_buffers.h); returns its
  // size in bytes.
  m.def("release_grad_buffers() -> int", &kdplug::grad_buffers::release);
  // Raises the first bad top-k index or label a CUDA kernel recorded (kernel_faults.h), and
  // clears it; wait: after every queued kernel has run, else only from records already copied
  // to the host. A no-op without CUDA (the CPU kernels raise at once).
  m.def("check_kernel_faults(bool wait=True) -> ()", &kdplug::kernel_faults::check);
  // Raises the error of a fault record [code, op, row, value, cols, ignore_index] (kd_faults.h),
  // as the CUDA path does; for tests on machines without a GPU.
  m.def("raise_kernel_fault(int[] record) -> ()", &kdplug::kernel_faults::raise_fields);
}
