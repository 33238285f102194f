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

  // Channel relation (C x C Gram of normalised channel rows). Returns the loss, grad_gram =
  // d loss / d G_s (B x C x C) for a unit upstream gradient, and row_stats (B x C x 2): for "l2"
  // the row norms (second entry 0), for "softmax" the row max of F / tau and the row sum of
  // exp(F / tau - max).
  m.def("channel_relation(Tensor fs, Tensor ft, str normalize, str distance, float tau) -> (Tensor, Tensor, Tensor)");
  m.def("channel_relation_backward(Tensor grad, Tensor fs, Tensor grad_gram, Tensor row_stats, str normalize, float tau) -> Tensor");

  // Pixel relation, "mse": the algebraic route in float64. Returns the loss and the float64
  // Grams m_ss = A A^T (B x Cs x Cs) and m_st = A T^T (B x Cs x Ct) of the pixel-normalised
  // student A and teacher T, which the backward multiplies back onto A and T.
  m.def("pixel_relation_mse(Tensor fs, Tensor ft) -> (Tensor, Tensor, Tensor)");
  m.def("pixel_relation_mse_backward(Tensor grad, Tensor fs, Tensor ft, Tensor m_ss, Tensor m_st) -> Tensor");

  // Pixel relation, "kl": tiled, flash-attention style; never holds the N x N matrices. Returns
  // the loss and the row log-sum-exps of S_s / tau and S_t / tau (B x N) for the recomputing
  // backward.
  m.def("pixel_relation_kl(Tensor fs, Tensor ft, float tau) -> (Tensor, Tensor, Tensor)");
  m.def("pixel_relation_kl_backward(Tensor grad, Tensor fs, Tensor ft, Tensor lse_s, Tensor lse_t, float tau) -> Tensor");

  // Channel-wise KL (CWD). Returns the loss and per (b, c) row (lse_t, lse_s - lse_t) (B x C x 2),
  // from which the backward recomputes p_s - p_t in one pass over fs and ft.
  m.def("channel_wise_kl(Tensor fs, Tensor ft, float tau) -> (Tensor, Tensor)");
  m.def("channel_wise_kl_backward(Tensor grad, Tensor fs, Tensor ft, Tensor stats, float tau) -> Tensor");

  // Structure loss. Returns the loss and, when need_grad, the unit gradient d loss / d logits
  // (B x K x H x W, contiguous, float32/float64) made in the forward; else an empty tensor.
  m.def("structure(Tensor logits, Tensor mask, bool need_grad) -> (Tensor, Tensor)");

  // Pixel KL (response KD). Returns the loss and, when need_grad, d loss / d zs for a unit
  // upstream gradient (zs's dtype and shape; else an empty tensor), written in the same pass, so
  // the backward is one scale by the upstream gradient.
  m.def("pixel_kl(Tensor zs, Tensor zt, float temperature, Tensor? mask, bool need_grad) -> (Tensor, Tensor)");

  // KDAS Symmetrical Guiding Module, one pass: the loss and, if need_grad, d loss / d ps for a
  // unit upstream gradient (ps's dtype and layout; else an empty tensor), so the backward is a
  // scale.
  m.def("sgm(Tensor ps, Tensor pt, str distance, bool need_grad) -> (Tensor, Tensor)");

  // Logit attention (KDAS): returns the loss and, when need_grad, d loss / d ps for a unit
  // upstream gradient (ps's shape, accumulation dtype; empty otherwise): the whole backward runs
  // with the forward, while the map's attention is in cache, and autograd only scales it.
  m.def("logit_attention(Tensor ps, Tensor pt, float tau, bool need_grad) -> (Tensor, Tensor)");
}
