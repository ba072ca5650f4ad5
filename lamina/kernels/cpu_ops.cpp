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


// ---------------------------------------------------------------------------------------------
// Paged decode attention: one new token per sequence attends over its cached K/V, read in place
// through the block table. torch's path gathers each sequence's blocks into a padded copy first, so
// the cache crosses memory three times (read, write, read) instead of once; in a batch of 32
// sequences of a few hundred tokens that traffic is most of a decode step.

float load_float(float v) { return v; }
float load_float(uint16_t v) { return bf16_to_float(v); }

#ifdef LAMINA_AVX512
__m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

// sum(a[i] * b[i]) over n; a in float32, b in the cache's dtype
template <typename T>
float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float acc = 0.f;
#ifdef LAMINA_AVX512
  __m512 v = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) v = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), v);
  acc = hsum(v);
#endif
  for (; i < n; i++) acc += a[i] * load_float(b[i]);
  return acc;
}

// y += p * b over n
template <typename T>
void axpy(float p, const T* b, float* y, int64_t n) {
  int64_t i = 0;
#ifdef LAMINA_AVX512
  const __m512 vp = _mm512_set1_ps(p);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(vp, load16(b + i), _mm512_loadu_ps(y + i)));
#endif
  for (; i < n; i++) y[i] += p * load_float(b[i]);
}

#ifdef LAMINA_AVX512
// exp(x) for x <= 0: 2^(x log2 e) split into 2^n (VSCALEFPS) times 2^f, f in [-1/2, 1/2], from its
// Taylor series to degree 6 (relative error ~1e-7, float32's own)
__m512 exp16(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.54035304e-4f);
  for (const float c : {1.33335581e-3f, 9.61812911e-3f, 5.55041087e-2f, 2.40226507e-1f, 6.93147181e-1f, 1.0f})
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// lane i of the result = the sum of v[i]'s 16 lanes: a transposing tree of 15 adds, where 16
// separate horizontal sums would take ~8 instructions each
__m512 sum_each(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; i++)  // per 128-bit lane: [v0 v1 v0 v1] partial sums of 2 rows
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; i++) {  // per 128-bit lane: one partial sum of each of 4 rows
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; i++)  // 128-bit lanes 0-1 and 2-3 hold rows 4i..4i+3 and 4i+4..4i+7, half summed
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88), _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xdd));
}

// out[h] = sum over t of p[h][t] * V[t] for H heads of D = 16 * NV channels, accumulated in registers
template <typename T, int NV, int H, typename Row>
void weighted_values(const float* p, int64_t len, const Row& row, const T* v_cache, float* out) {
  __m512 acc[H][NV];
  for (int h = 0; h < H; h++)
    for (int j = 0; j < NV; j++) acc[h][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; t++) {
    const T* v = row(v_cache, t);
    __m512 vv[NV];
    for (int j = 0; j < NV; j++) vv[j] = load16(v + 16 * j);
    for (int h = 0; h < H; h++) {
      const __m512 ph = _mm512_set1_ps(p[h * len + t]);
      for (int j = 0; j < NV; j++) acc[h][j] = _mm512_fmadd_ps(ph, vv[j], acc[h][j]);
    }
  }
  for (int h = 0; h < H; h++)
    for (int j = 0; j < NV; j++) _mm512_storeu_ps(out + h * NV * 16 + 16 * j, acc[h][j]);
}

// the same for one head of any D that is a multiple of 16 (up to 256)
template <typename T, typename Row>
void weighted_values_one(const float* p, int64_t len, const Row& row, const T* v_cache, float* out, int64_t D) {
  __m512 acc[16];
  const int64_t nv = D / 16;
  for (int64_t j = 0; j < nv; j++) acc[j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; t++) {
    const T* v = row(v_cache, t);
    const __m512 pt = _mm512_set1_ps(p[t]);
    for (int64_t j = 0; j < nv; j++) acc[j] = _mm512_fmadd_ps(pt, load16(v + 16 * j), acc[j]);
  }
  for (int64_t j = 0; j < nv; j++) _mm512_storeu_ps(out + 16 * j, acc[j]);
}
#endif

// The query heads of one KV head (GQA) for one sequence: two passes over its cached tokens, keys
// then values, with an exact softmax in between. scores: [group, len] scratch.
template <typename T>
void attend(const float* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t len,
            int64_t block_size, int64_t num_kv_heads, int64_t kv_head, int64_t D, int64_t group,
            float scale, float* out, std::vector<float>& scores) {
  scores.resize(group * len);
  auto row = [&](const T* cache, int64_t t) {
    const int64_t slot = int64_t(table[t / block_size]) * block_size + t % block_size;
    return cache + (slot * num_kv_heads + kv_head) * D;
  };
  int64_t t0 = 0;
#ifdef LAMINA_AVX512
  if (D % 16 == 0 && D <= 256)
    for (; t0 + 16 <= len; t0 += 16)
      for (int64_t g = 0; g < group; g++) {
        __m512 part[16];
        for (int i = 0; i < 16; i++) {
          const T* k = row(k_cache, t0 + i);
          __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q + g * D), load16(k));
          for (int64_t j = 16; j < D; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + j), load16(k + j), acc);
          part[i] = acc;
        }
        _mm512_storeu_ps(scores.data() + g * len + t0, _mm512_mul_ps(_mm512_set1_ps(scale), sum_each(part)));
      }
#endif
  for (int64_t t = t0; t < len; t++) {
    const T* k = row(k_cache, t);
    for (int64_t g = 0; g < group; g++) scores[g * len + t] = scale * dot(q + g * D, k, D);
  }
  std::vector<float> total(group);
  for (int64_t g = 0; g < group; g++) {
    float* s = scores.data() + g * len;
    const float mx = *std::max_element(s, s + len);
    float sum = 0.f;
    int64_t t = 0;
#ifdef LAMINA_AVX512
    __m512 vsum = _mm512_setzero_ps();
    for (; t + 16 <= len; t += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), _mm512_set1_ps(mx)));
      _mm512_storeu_ps(s + t, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    sum = hsum(vsum);
#endif
    for (; t < len; t++) sum += (s[t] = std::exp(s[t] - mx));
    total[g] = sum;
  }
  std::fill_n(out, group * D, 0.f);
  int64_t g0 = 0;
#ifdef LAMINA_AVX512
  // the output rows of a few heads at a time stay in registers for the whole pass over V
  const float* p = scores.data();
  if (D == 64) {
    for (; group - g0 >= 4; g0 += 4) weighted_values<T, 4, 4>(p + g0 * len, len, row, v_cache, out + g0 * D);
    switch (group - g0) {
      case 3: weighted_values<T, 4, 3>(p + g0 * len, len, row, v_cache, out + g0 * D); break;
      case 2: weighted_values<T, 4, 2>(p + g0 * len, len, row, v_cache, out + g0 * D); break;
      case 1: weighted_values<T, 4, 1>(p + g0 * len, len, row, v_cache, out + g0 * D); break;
    }
    g0 = group;
  } else if (D % 16 == 0 && D <= 256) {
    for (; g0 < group; g0++) weighted_values_one<T>(p + g0 * len, len, row, v_cache, out + g0 * D, D);
  }
#endif
  for (int64_t t = 0; t < len; t++) {
    const T* v = row(v_cache, t);
    for (int64_t g = g0; g < group; g++) axpy(scores[g * len + t], v, out + g * D, D);
  }
  for (int64_t g = 0; g < group; g++)
    for (int64_t d = 0; d < D; d++) out[g * D + d] /= total[g];
}

template <typename T>
void decode_attention_typed(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                            at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t block_size = k_cache.size(1), Hkv = k_cache.size(2), width = block_tables.size(1);
  const int64_t group = Hq / Hkv;
  auto k = reinterpret_cast<const T*>(k_cache.data_ptr());
  auto v = reinterpret_cast<const T*>(v_cache.data_ptr());
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; task++) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const int64_t len = lens[b];
      TORCH_CHECK(len >= 1 && (len + block_size - 1) / block_size <= width, "sequence ", b, " has ", len,
                  " tokens, more than its block table holds");
      attend(qp + (b * Hq + h * group) * D, k, v, tables + b * width, len, block_size, Hkv, h, D, group,
             float(scale), op + (b * Hq + h * group) * D, scores);
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat, "q must be float32 [B, Hq, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type()
              && k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.size(3) == q.size(2),
              "caches must be contiguous [blocks, block_size, Hkv, D] of one dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt
              && block_tables.size(0) == q.size(0) && seq_lens.size(0) == q.size(0),
              "block_tables [B, W] and seq_lens [B] must be int32");
  const at::Tensor qc = q.contiguous(), tables = block_tables.contiguous(), lens = seq_lens.contiguous();
  at::Tensor out = at::empty_like(qc);
  if (k_cache.scalar_type() == at::kFloat)
    decode_attention_typed<float>(qc, k_cache, v_cache, tables, lens, scale, out);
  else if (k_cache.scalar_type() == at::kBFloat16)
    decode_attention_typed<uint16_t>(qc, k_cache, v_cache, tables, lens, scale, out);
  else
    TORCH_CHECK(false, "the KV cache must be float32 or bfloat16");
  return out;
}

}  // namespace

// A macro layer, so that a test can build the plain paths under another namespace.
#define LAMINA_DEFINE_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
LAMINA_DEFINE_LIBRARY(LAMINA_NAMESPACE, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, float scale) -> Tensor");
  m.impl("int8_linear", c10::DispatchKey::CPU, TORCH_FN(int8_linear));
  m.impl("bf16_linear", c10::DispatchKey::CPU, TORCH_FN(bf16_linear));
  m.impl("paged_decode_attention", c10::DispatchKey::CPU, TORCH_FN(paged_decode_attention));
}
