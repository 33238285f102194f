// Bilinear resampling index math, shared by the CPU and CUDA kernels (and their unit test).
//
// It reproduces PyTorch's upsample_bilinear2d with align_corners=False and an explicit output
// size: scale = in / out, src = max(scale * (o + 0.5) - 0.5, 0), taps floor(src) and the next
// row (clamped), weights 1 - frac and frac. The backward pass is a gather: for input index i it
// walks a short window of output indices whose taps may touch i and keeps those that do. That
// avoids atomics (deterministic) and never materialises the resampled tensor.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define KDK_HD __host__ __device__ __forceinline__
#else
#define KDK_HD inline
#endif

namespace kdk {

struct Taps {
  int64_t i0, i1;  // the two input indices (equal at the last row)
  float l0, l1;    // their weights, l0 + l1 == 1
};

// scale must be computed as float(in) / float(out), exactly as PyTorch does.
KDK_HD Taps bilinear_taps(int64_t o, int64_t in_size, float scale) {
  float src = scale * (static_cast<float>(o) + 0.5f) - 0.5f;
  if (src < 0.f) src = 0.f;
  int64_t i0 = static_cast<int64_t>(src);
  if (i0 > in_size - 1) i0 = in_size - 1;
  const int64_t i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  const float l1 = src - static_cast<float>(i0);
  return Taps{i0, i1, 1.f - l1, l1};
}

// Weight with which output index o reads input index i (0 when it does not).
KDK_HD float bilinear_weight(int64_t o, int64_t i, int64_t in_size, float scale) {
  const Taps t = bilinear_taps(o, in_size, scale);
  return (t.i0 == i ? t.l0 : 0.f) + (t.i1 == i ? t.l1 : 0.f);
}

// First output index that may read input index i; outputs [first, first + window) cover all
// that do (the caller checks bilinear_weight). o reads i only if floor(src(o)) is i - 1 or i,
// i.e. i - 1 <= src(o) < i + 1; src(o) = scale * (o + 0.5) - 0.5 is increasing, so o lies in
// [(i - 0.5) / scale - 0.5, (i + 1.5) / scale - 0.5), a range of length 2 / scale. One extra
// index on each side absorbs float rounding.
KDK_HD int64_t bilinear_window_first(int64_t i, float scale) {
  const float lo = (static_cast<float>(i) - 0.5f) / scale - 0.5f;
  const int64_t first = static_cast<int64_t>(lo < 0.f ? 0.f : lo) - 1;
  return first < 0 ? 0 : first;
}

KDK_HD int64_t bilinear_window(float scale) {
  return static_cast<int64_t>(2.f / scale) + 4;
}

// Weight with which the output whose taps are t reads input index i (bilinear_weight, taps given).
KDK_HD float tap_weight(const Taps& t, int64_t i) {
  return (t.i0 == i ? t.l0 : 0.f) + (t.i1 == i ? t.l1 : 0.f);
}

// The outputs in [0, out_size) that read input index i with a nonzero weight lie in [lo, hi)
// (lo == hi when none do). Scanning the window once per input index lets a gather kernel skip
// the dead part of the window for every channel; callers still test each weight.
struct Range {
  int64_t lo, hi;
};

KDK_HD Range bilinear_hit_range(int64_t i, int64_t in_size, int64_t out_size, float scale) {
  const int64_t first = bilinear_window_first(i, scale);
  int64_t end = first + bilinear_window(scale);
  if (end > out_size) end = out_size;
  Range r{0, 0};
  for (int64_t o = first; o < end; ++o) {
    if (tap_weight(bilinear_taps(o, in_size, scale), i) != 0.f) {
      if (r.lo == r.hi) r.lo = o;  // first hit
      r.hi = o + 1;
    }
  }
  return r;
}

}  // namespace kdk
