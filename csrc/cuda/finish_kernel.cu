// Fixed-order sum of per-block partials into a loss (see finish_kernel.h). One block: the
// partials number one per block of the kernel before (thousands at most), which one block reads
// in a few microseconds, and a single block needs no inter-block protocol.
#include "finish_kernel.h"

#include <cuda_runtime.h>

#include <cstdint>

namespace kdk {
namespace gpu {
namespace {

constexpr int kThreads = 256;

template <typename P, typename L>
__global__ void __launch_bounds__(kThreads)
    finish(const P* __restrict__ partial, int64_t n, double scale, const int64_t* __restrict__ count, bool clamp_zero,
           L* loss) {
  __shared__ double red[kThreads];
  double sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) sum += static_cast<double>(partial[i]);
  red[threadIdx.x] = sum;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {  // a fixed tree
    if (threadIdx.x < width) red[threadIdx.x] += red[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    double total = (clamp_zero && red[0] < 0 ? 0.0 : red[0]) * scale;
    if (count != nullptr) total /= static_cast<double>(*count);
    *loss = static_cast<L>(total);
  }
}

template <typename P>
cudaError_t launch(const P* partial, int64_t n, double scale, const int64_t* count, bool clamp_zero, void* loss,
                   bool loss_f64, cudaStream_t stream) {
  if (loss_f64)
    finish<P, double><<<1, kThreads, 0, stream>>>(partial, n, scale, count, clamp_zero, static_cast<double*>(loss));
  else
    finish<P, float><<<1, kThreads, 0, stream>>>(partial, n, scale, count, clamp_zero, static_cast<float*>(loss));
  return cudaGetLastError();
}

}  // namespace

cudaError_t finish_sum(const void* partial, bool partial_f64, int64_t n, double scale, const int64_t* count,
                       bool clamp_zero, void* loss, bool loss_f64, cudaStream_t stream) {
  if (partial_f64) return launch(static_cast<const double*>(partial), n, scale, count, clamp_zero, loss, loss_f64, stream);
  return launch(static_cast<const float*>(partial), n, scale, count, clamp_zero, loss, loss_f64, stream);
}

}  // namespace gpu
}  // namespace kdk
