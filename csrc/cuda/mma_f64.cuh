// Float64 tensor-core primitive (sm_80 and later): IEEE float64 products and sums, so a Gram
// on the tensor cores keeps float64's accuracy. The CPU emulation of the kernels
// (tests/cuda_emulation) replaces this header with one of the same names.
#pragma once

namespace kdk {
namespace gpu {

// (d0, d1) += A B for one m8n8k4 tile, fragments as the PTX ISA lays them out: with g = lane / 4
// and t = lane % 4, a = A[g][t], b = B[t][g], (d0, d1) = (D[g][2t], D[g][2t + 1]).
__device__ __forceinline__ void mma_f64(double& d0, double& d1, double a, double b) {
  asm("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0,%1}, {%2}, {%3}, {%0,%1};"
      : "+d"(d0), "+d"(d1)
      : "d"(a), "d"(b));
}

}  // namespace gpu
}  // namespace kdk
