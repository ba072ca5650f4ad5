// What lamina's CPU kernel sources (cpu_ops.cpp, cpu_quant.cpp) share; cpu.py builds them into one
// library, whose ops each source registers under LAMINA_NAMESPACE.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define LAMINA_AVX512 1
#endif

#ifndef LAMINA_NAMESPACE
#define LAMINA_NAMESPACE lamina
#endif

namespace {

inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float load_float(float v) { return v; }
inline float load_float(uint16_t v) { return bf16_to_float(v); }

}  // namespace
