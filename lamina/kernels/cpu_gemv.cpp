// Matrix-vector products for CPU decode: y[M, N] = x[M, K] @ W[N, K]^T for a few rows of x, with W
// in bfloat16 or int8 (one scale per output channel).
//
// Decoding a small model reads every weight once per token, so these kernels aim at the memory
// bandwidth. On 2 Zen 4 cores torch's bf16 and int8 GEMVs are compute-bound well below it; the
// AVX-512 paths here do fewer instructions per weight byte:
//   bf16: VDPBF16PS, 32 multiply-adds per instruction.
//   int8: widened to float32 in registers, 16 multiply-adds per instruction. (Rounding the
//         activations to int8 for VPDPBUSD, as llama.cpp does, was 10 % faster but moved greedy
//         logprobs by up to 0.3 against float32; this keeps them where torch's int8 kernel does.)
// Both also have a plain C++ path for other CPUs, with the same sums in float32.
//
// Built on first use by lamina/kernels/cpu.py (g++ -O3 -march=native) and loaded with
// torch.ops.load_library; Python gives the ops their shapes for torch.compile.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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

constexpr int64_t kGrainRows = 64;      // output channels per parallel task, at least

float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// x [M, K] as float32, whatever floating type it came in
std::vector<float> rows_as_float(const at::Tensor& x) {
  at::Tensor c = x.contiguous();
  std::vector<float> out(c.numel());
  if (c.scalar_type() == at::kFloat) {
    std::memcpy(out.data(), c.data_ptr<float>(), out.size() * sizeof(float));
  } else if (c.scalar_type() == at::kBFloat16) {
    auto p = reinterpret_cast<const uint16_t*>(c.data_ptr());
    for (size_t i = 0; i < out.size(); i++) out[i] = bf16_to_float(p[i]);
  } else {
    auto f = c.to(at::kFloat);
    std::memcpy(out.data(), f.data_ptr<float>(), out.size() * sizeof(float));
  }
  return out;
}

// y [M, N] in x's dtype from float32 results
at::Tensor make_output(const at::Tensor& x, const std::vector<float>& y, int64_t M, int64_t N) {
  if (x.scalar_type() == at::kBFloat16) {
    at::Tensor out = at::empty({M, N}, x.options());
    auto p = reinterpret_cast<uint16_t*>(out.data_ptr());
    for (int64_t i = 0; i < M * N; i++) p[i] = float_to_bf16(y[i]);
    return out;
  }
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  std::memcpy(out.data_ptr<float>(), y.data(), y.size() * sizeof(float));
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

void check_rows(const at::Tensor& x, const at::Tensor& w, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x must be [M, ", k, "], got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "lamina's CPU GEMV takes CPU tensors");
  TORCH_CHECK(w.is_contiguous(), "weights must be contiguous");
}

#ifdef LAMINA_AVX512
float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#endif

// ---------------------------------------------------------------------------------------------
// int8: W = weight * scale[n]

template <int NT>
void int8_rows(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, float* y,
               int64_t N, int64_t n) {
  for (int64_t m = 0; m < M; m++) {
    const float* xm = x + m * K;
    int64_t k = 0;
    float acc[NT] = {};
#ifdef LAMINA_AVX512
    __m512 vacc[NT];
    for (int t = 0; t < NT; t++) vacc[t] = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
      const __m512 xv = _mm512_loadu_ps(xm + k);
      for (int t = 0; t < NT; t++) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n + t) * K + k));
        vacc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), xv, vacc[t]);
      }
    }
    for (int t = 0; t < NT; t++) acc[t] = hsum(vacc[t]);
#endif
    for (; k < K; k++)
      for (int t = 0; t < NT; t++) acc[t] += float(w[(n + t) * K + k]) * xm[k];
    for (int t = 0; t < NT; t++) y[m * N + n + t] = acc[t] * scale[n + t];
  }
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  const int64_t N = weight.size(0), K = weight.size(1), M = x.size(0);
  check_rows(x, weight, K);
  TORCH_CHECK(weight.scalar_type() == at::kChar, "int8 weight must be int8 [N, K]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N,
              "int8 scale must be contiguous float32 [N]");
  const std::vector<float> xf = rows_as_float(x);
  std::vector<float> y(M * N);
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  at::parallel_for(0, N, kGrainRows, [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) int8_rows<4>(xf.data(), M, K, w, s, y.data(), N, n);
    for (; n < n1; n++) int8_rows<1>(xf.data(), M, K, w, s, y.data(), N, n);
  });
  return make_output(x, y, M, N);
}

// ---------------------------------------------------------------------------------------------
// bfloat16 weights

template <int NT>
void bf16_rows(const uint16_t* xb, int64_t M, int64_t K, const uint16_t* w, float* y, int64_t N, int64_t n) {
  for (int64_t m = 0; m < M; m++) {
    int64_t k = 0;
    float acc[NT] = {};
#if defined(LAMINA_AVX512) && defined(__AVX512BF16__)
    __m512 vacc[NT];
    for (int t = 0; t < NT; t++) vacc[t] = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + m * K + k);
      for (int t = 0; t < NT; t++)
        vacc[t] = _mm512_dpbf16_ps(vacc[t], (__m512bh)_mm512_loadu_si512(w + (n + t) * K + k), xv);
    }
    for (int t = 0; t < NT; t++) acc[t] = hsum(vacc[t]);
#endif
    for (; k < K; k++)
      for (int t = 0; t < NT; t++) acc[t] += bf16_to_float(w[(n + t) * K + k]) * bf16_to_float(xb[m * K + k]);
    for (int t = 0; t < NT; t++) y[m * N + n + t] = acc[t];
  }
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight) {
  const int64_t N = weight.size(0), K = weight.size(1), M = x.size(0);
  check_rows(x, weight, K);
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "weight must be bfloat16 [N, K]");
  const std::vector<float> xf = rows_as_float(x);
  // x rounded to bf16: VDPBF16PS multiplies bf16 pairs (a no-op when x is bf16 already)
  std::vector<uint16_t> xb(xf.size());
  for (size_t i = 0; i < xf.size(); i++) xb[i] = float_to_bf16(xf[i]);
  std::vector<float> y(M * N);
  auto w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  at::parallel_for(0, N, kGrainRows, [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) bf16_rows<4>(xb.data(), M, K, w, y.data(), N, n);
    for (; n < n1; n++) bf16_rows<1>(xb.data(), M, K, w, y.data(), N, n);
  });
  return make_output(x, y, M, N);
}

}  // namespace

// A macro layer, so that a test can build the plain paths under another namespace.
#define LAMINA_DEFINE_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
LAMINA_DEFINE_LIBRARY(LAMINA_NAMESPACE, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor weight) -> Tensor");
  m.impl("int8_linear", c10::DispatchKey::CPU, TORCH_FN(int8_linear));
  m.impl("bf16_linear", c10::DispatchKey::CPU, TORCH_FN(bf16_linear));
}
