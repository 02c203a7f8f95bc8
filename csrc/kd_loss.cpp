// Schema of kdplug's fused KD loss. Kernels live per device in cpu/ and cuda/; autograd, the fake
// (meta) kernel, input validation and the pure-PyTorch fallback live in kdplug/ops.py.
#include <Python.h>
#include <torch/library.h>

// Importing kdplug._C loads this library and so registers the ops below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(kdplug, m) {
  // Rows of student/teacher logits [rows, classes] -> (loss, grad_student, grad_teacher).
  // loss: float32, [rows] for reduction 0 (none), a scalar for 1 (sum) and 2 (batchmean).
  // grad_student = d loss / d student (for none: d loss_row / d student_row), written in the same
  // pass; grad_teacher likewise when teacher_grad, else an empty tensor. Rows where mask is false
  // have loss 0 and gradient 0 and are not counted by batchmean.
  m.def("kd_kl_fwd(Tensor student, Tensor teacher, float temperature, Tensor? mask, "
        "int reduction, bool teacher_grad) -> (Tensor, Tensor, Tensor)");
  // The same contract, computed row by row with exactly the scalar arithmetic of kd_math.h that
  // the CUDA kernel runs; CPU only, for tests.
  m.def("kd_kl_fwd_portable(Tensor student, Tensor teacher, float temperature, Tensor? mask, "
        "int reduction, bool teacher_grad) -> (Tensor, Tensor, Tensor)");
  // A teacher known on k classes per row: indices int64 [rows, k] (distinct within a row) and
  // values float32 [rows, k], its log-probabilities at T = 1. rest_bucket keeps the teacher's mass
  // outside the top-k as one class; otherwise the top-k is renormalized (see kd_math.h).
  // -> (loss, grad_student), loss and reduction as for kd_kl_fwd.
  m.def("kd_kl_topk_fwd(Tensor student, Tensor indices, Tensor values, float temperature, "
        "Tensor? mask, int reduction, bool rest_bucket) -> (Tensor, Tensor)");
}
