// The kdkernels operator schemas, declared once. Implementations are registered per dispatch
// key in csrc/cpu/ and csrc/cuda/; fake (meta) kernels and autograd live in kdkernels/ops/.
#include <Python.h>
#include <torch/library.h>

// `import kdkernels._C` only needs to load this library so the registrations below run.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(kdkernels, m) {
  // Attention transfer. The student fs is bilinearly resized to the teacher's spatial size when
  // the sizes differ. Returns the loss and coeff = d loss / d m_s (B x Ht x Wt) for a unit
  // upstream gradient, so the backward is a single pass over fs.
  m.def("attention_transfer(Tensor fs, Tensor ft, float p, str reduction) -> (Tensor, Tensor)");
  m.def("attention_transfer_backward(Tensor grad, Tensor fs, Tensor coeff, float p) -> Tensor");
}
