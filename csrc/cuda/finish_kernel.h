// The last step of a loss on CUDA: the fixed-order sum of per-block partials, scaled. Torch-free
// (see attention_transfer_kernel.h); the glue passes raw pointers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kdk {
namespace gpu {

// *loss = scale * sum(partial[0:n]) / (count ? *count : 1), the sum first raised to 0 when
// clamp_zero (a sum of squares written as a difference), in one block of one kernel: partial
// is double or float (partial_f64), count an int64 on the device (or null), loss a float or
// double (loss_f64) on the device. The sum runs in double in an order fixed by n alone
// (deterministic). count == 0 gives 0 / 0 = NaN, as the eager reference does.
cudaError_t finish_sum(const void* partial, bool partial_f64, int64_t n, double scale, const int64_t* count,
                       bool clamp_zero, void* loss, bool loss_f64, cudaStream_t stream);

}  // namespace gpu
}  // namespace kdk
