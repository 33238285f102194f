// TF32 tensor-core primitives (sm_80 and later) for split-precision float32 products ("3xTF32"):
// x = big + small with big = tf32(x) and small = tf32(x - big), and
//   a b ~ a_small b_big + a_big b_small + a_big b_big,
// ~2^-21 relative error per product (plain TF32: ~2^-11), accumulated in float32. The CPU
// emulation of the kernels (tests/cuda_emulation) replaces this header with one of the same names.
#pragma once

#include <cstdint>

namespace kdk {
namespace gpu {

// x rounded to TF32 (10-bit mantissa, to nearest, ties away from zero), as the bits of a float.
__device__ __forceinline__ uint32_t tf32_round(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

// d += A B for one m16n8k8 tile, fragments as the PTX ISA lays them out: with g = lane / 4 and
// t = lane % 4, a = {A[g][t], A[g + 8][t], A[g][t + 4], A[g + 8][t + 4]},
// b = {B[t][g], B[t + 4][g]}, d = {D[g][2t], D[g][2t + 1], D[g + 8][2t], D[g + 8][2t + 1]}.
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

}  // namespace gpu
}  // namespace kdk
