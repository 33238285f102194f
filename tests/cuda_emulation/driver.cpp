// C entry points of the emulated CUDA kernels for ctypes (see build.py): the launchers of
// csrc/cuda/*_kernel.h, unchanged, on host memory.
#include "cuda/attention_transfer_kernel.h"
#include "cuda/finish_kernel.h"
#include "cuda/pixel_kl_kernel.h"
#include "cuda/relations_kernel.h"
#include "cuda/sgm_kernel.h"

using kdk::gpu::Mask3;
using kdk::gpu::Tensor4;

extern "C" {
int64_t emu_launches() { return emu::launches; }
int64_t emu_cr_workspace(const Tensor4* fs) { return kdk::gpu::cr_workspace(*fs); }
int emu_cr_forward(const Tensor4* fs, const Tensor4* ft, int softmax, int kl, double tau, void* ws, void* gg,
                   void* rs, void* loss) {
  return kdk::gpu::cr_forward(*fs, *ft, softmax, kl, tau, ws, gg, rs, loss, nullptr);
}
int emu_cr_backward(const void* grad, const Tensor4* fs, const void* gg, const void* rs, int softmax, double tau,
                    void* out, const int64_t* stride) {
  return kdk::gpu::cr_backward(grad, *fs, gg, rs, softmax, tau, out, stride, nullptr);
}
int64_t emu_prm_workspace(const Tensor4* fs, const Tensor4* ft) { return kdk::gpu::prm_workspace(*fs, *ft); }
int emu_prm_forward(const Tensor4* fs, const Tensor4* ft, void* ws, void* m_ss, void* m_st, void* loss) {
  return kdk::gpu::prm_forward(*fs, *ft, ws, m_ss, m_st, loss, nullptr);
}
int emu_prm_backward(const void* grad, const Tensor4* fs, const Tensor4* ft, const void* m_ss, const void* m_st,
                     void* out, const int64_t* stride) {
  return kdk::gpu::prm_backward(grad, *fs, *ft, m_ss, m_st, out, stride, nullptr);
}
int64_t emu_prk_forward_workspace(const Tensor4* fs) { return kdk::gpu::prk_forward_workspace(*fs); }
int64_t emu_prk_backward_workspace(const Tensor4* fs) { return kdk::gpu::prk_backward_workspace(*fs); }
int emu_prk_forward(const Tensor4* fs, const Tensor4* ft, double tau, void* ws, void* lse_s, void* lse_t,
                    void* loss) {
  return kdk::gpu::prk_forward(*fs, *ft, tau, ws, lse_s, lse_t, loss, nullptr);
}
int emu_prk_backward(const void* grad, const Tensor4* fs, const Tensor4* ft, double tau, const void* lse_s,
                     const void* lse_t, void* ws, void* out, const int64_t* stride) {
  return kdk::gpu::prk_backward(grad, *fs, *ft, tau, lse_s, lse_t, ws, out, stride, nullptr);
}

int64_t emu_at_forward_workspace(const Tensor4* fs, const Tensor4* ft) {
  return kdk::gpu::at_forward_workspace(*fs, *ft);
}
int emu_at_forward(const Tensor4* fs, const Tensor4* ft, double p, double scale, void* ws, void* partial, void* coeff,
                   void* counter, void* loss) {
  return kdk::gpu::at_forward(*fs, *ft, p, scale, ws, partial, coeff, counter, loss, nullptr);
}
int emu_at_backward(const void* grad, const Tensor4* fs, void* out, const int64_t* stride, const void* coeff,
                    int64_t Ho, int64_t Wo, double p) {
  return kdk::gpu::at_backward(grad, *fs, out, stride, coeff, Ho, Wo, p, nullptr);
}
int64_t emu_sgm_partials(const Tensor4* ps) { return kdk::gpu::sgm_partials(*ps); }
int emu_sgm_forward(const Tensor4* ps, const Tensor4* pt, int l1, double unit_scale, void* grad,
                    const int64_t* stride, void* partial) {
  return kdk::gpu::sgm_forward(*ps, *pt, l1, unit_scale, grad, stride, partial, nullptr);
}
int64_t emu_pixel_kl_partials(const Tensor4* zs) { return kdk::gpu::pixel_kl_partials(*zs); }
int emu_pixel_kl_forward(const Tensor4* zs, const Tensor4* zt, const bool* mask, const int64_t* mask_stride,
                         const int64_t* count_dev, int64_t count_host, double temperature, void* grad,
                         const int64_t* stride, double* partial) {
  const Mask3 m{mask, {mask_stride[0], mask_stride[1], mask_stride[2]}};
  return kdk::gpu::pixel_kl_forward(*zs, *zt, m, count_dev, count_host, temperature, grad, stride, partial, nullptr);
}
int emu_finish_sum(const void* partial, int partial_f64, int64_t n, double scale, const int64_t* count,
                   int clamp_zero, void* loss, int loss_f64) {
  return kdk::gpu::finish_sum(partial, partial_f64, n, scale, count, clamp_zero, loss, loss_f64, nullptr);
}
}
