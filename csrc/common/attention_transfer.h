// Attention transfer shared pieces: the per-element power and its derivative, specialised for
// the p = 2 and p = 4 fast paths (P = 0 is the general exponent), and the normalisation eps.
#pragma once

#include <cmath>
#include <cstdint>

#include "bilinear.h"

namespace kdk {

constexpr double kNormEps = 1e-12;

// The L2-normalisation epsilon in the accumulation type (1e-12 is a normal float).
template <typename acc_t>
KDK_HD acc_t norm_eps() { return static_cast<acc_t>(kNormEps); }

// |v|^p; CUDA device code has its own float and double overloads of pow, the host uses std::.
template <typename acc_t>
KDK_HD acc_t abs_pow(acc_t v, acc_t p) {
#if defined(__CUDA_ARCH__)
  return pow(fabs(v), p);
#else
  return std::pow(std::fabs(v), p);
#endif
}

template <int P, typename acc_t>
KDK_HD acc_t at_power(acc_t v, acc_t p) {
  if (P == 2) return v * v;
  if (P == 4) { const acc_t v2 = v * v; return v2 * v2; }
  return v == acc_t(0) ? acc_t(0) : abs_pow(v, p);
}

// d|v|^p / dv, taken as 0 at v == 0 (where it is 0 for p > 1 and undefined for p <= 1).
template <int P, typename acc_t>
KDK_HD acc_t at_power_grad(acc_t v, acc_t p) {
  if (P == 2) return acc_t(2) * v;
  if (P == 4) return acc_t(4) * v * v * v;
  if (v == acc_t(0)) return acc_t(0);
  const acc_t mag = p * abs_pow(v, p - acc_t(1));
  return v > acc_t(0) ? mag : -mag;
}

// Which fast path a runtime exponent takes.
inline int at_power_kind(double p) { return p == 2.0 ? 2 : (p == 4.0 ? 4 : 0); }

}  // namespace kdk
