// Unit test of the bilinear gather window in common/bilinear.h (host only, no torch).
//
// The backward kernels find the outputs that read input index i by scanning
// [bilinear_window_first(i), + bilinear_window) and keeping the nonzero weights; an output outside
// that window would silently lose its gradient. For many (in, out) size pairs this checks that
// every nonzero weight lies in the window and in bilinear_hit_range (which must be exactly the
// nonzero set), that taps stay in range, and that the weights of every output sum to 1.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <utility>
#include <vector>

#include "common/bilinear.h"

namespace {

int g_failures = 0;

void fail(int64_t in, int64_t out, const char* what, int64_t i, int64_t o, double value) {
  if (++g_failures <= 20)
    std::printf("FAIL in=%lld out=%lld: %s (i=%lld o=%lld value=%.9g)\n", static_cast<long long>(in),
                static_cast<long long>(out), what, static_cast<long long>(i), static_cast<long long>(o),
                value);
}

void check_pair(int64_t in, int64_t out) {
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  std::vector<double> row_sum(out, 0.0);
  for (int64_t o = 0; o < out; ++o) {
    const kdk::Taps t = kdk::bilinear_taps(o, in, scale);
    if (t.i0 < 0 || t.i0 >= in || t.i1 < 0 || t.i1 >= in) fail(in, out, "tap out of range", t.i0, o, t.i1);
  }
  const int64_t window = kdk::bilinear_window(scale);
  for (int64_t i = 0; i < in; ++i) {
    const int64_t first = kdk::bilinear_window_first(i, scale);
    if (first < 0) fail(in, out, "negative window start", i, first, 0);
    const kdk::Range hits = kdk::bilinear_hit_range(i, in, out, scale);
    for (int64_t o = 0; o < out; ++o) {
      const float w = kdk::bilinear_weight(o, i, in, scale);
      if (w != kdk::tap_weight(kdk::bilinear_taps(o, in, scale), i)) fail(in, out, "tap_weight differs", i, o, w);
      if (w < 0.f || w > 1.f) fail(in, out, "weight outside [0, 1]", i, o, w);
      row_sum[o] += w;
      const bool in_window = first <= o && o < first + window;
      const bool in_hits = hits.lo <= o && o < hits.hi;
      if (w != 0.f && !in_window) fail(in, out, "nonzero weight outside the gather window", i, o, w);
      if ((w != 0.f) != in_hits) fail(in, out, "bilinear_hit_range is not the nonzero set", i, o, w);
    }
  }
  for (int64_t o = 0; o < out; ++o)
    if (std::fabs(row_sum[o] - 1.0) > 1e-6) fail(in, out, "weights do not sum to 1", -1, o, row_sum[o]);
}

}  // namespace

int main() {
  std::vector<std::pair<int64_t, int64_t>> pairs;
  // Every pair of sizes 1..60 whose ratio lies in [1/9, 9], plus wider ratios (the window is
  // derived for any scale), plus the shapes the losses meet in practice.
  for (int64_t in = 1; in <= 60; ++in)
    for (int64_t out = 1; out <= 60; ++out) pairs.emplace_back(in, out);
  const int64_t extra[][2] = {{24, 192}, {192, 24}, {88, 352}, {352, 88}, {7, 5},     {5, 7},
                              {44, 88},  {88, 44},  {22, 88},  {88, 22},  {56, 224},  {224, 56},
                              {96, 768}, {768, 96}, {1, 512},  {512, 1},  {513, 1024}, {1024, 513},
                              {333, 1000}, {1000, 333}, {4096, 455}, {455, 4096}};
  for (const auto& e : extra) pairs.emplace_back(e[0], e[1]);
  for (const auto& pr : pairs) check_pair(pr.first, pr.second);
  if (g_failures) {
    std::printf("%d failures\n", g_failures);
    return 1;
  }
  std::printf("bilinear window complete for %zu size pairs\n", pairs.size());
  return 0;
}
