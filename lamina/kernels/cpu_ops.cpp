// lamina's CPU kernels: the bf16 matmuls and the attention of a model on CPU (int8/int4 matmuls:
// cpu_quant.cpp).
//
// A small model on a 2-core machine spends its time in per-call overheads and in the wrong memory
// layout more than in arithmetic; these kernels avoid both:
//   bf16_packed_linear  y = x @ W^T on a weight packed once for VDPBF16PS (any number of rows)
//   bf16_packed_swiglu  the same GEMM for an MLP's fused gate/up weight, with SwiGLU applied to
//                       the accumulators: its [M, 2I] product is never written out
//   paged_decode_attention / paged_prefill_attention
//                       attention reading the paged KV cache in place through the block table
// Each has a plain C++ path for CPUs without AVX-512 (BF16), with the same sums in float32.
//
// Built on first use by lamina/kernels/cpu_build.py (g++ -O3 -march=native) and loaded with
// torch.ops.load_library; Python gives the ops their shapes for torch.compile.
#include "cpu_common.h"

#include <tuple>
#include <type_traits>

namespace {

#ifdef LAMINA_AVX512
float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#endif

// ---------------------------------------------------------------------------------------------
// bfloat16 GEMM on packed weights, for any number of rows (decode batches and prefill).
//
// torch's bf16 matmul (oneDNN) repacks the weight on every call, which for a few dozen rows and the
// small K of a small model costs about as much as the products. Here the weight is packed once, at
// load time (quant.pack_bf16): [N/16, K/2, 16, 2], so one 64-byte load holds two consecutive input
// channels of 16 output channels, the operand layout of VDPBF16PS. A tile of MR rows x 16*NB
// columns accumulates in float32 registers over all of K (K is a few thousand at most here) and is
// rounded to bf16 once, as torch rounds its float32 accumulators.

constexpr int kTileRows = 8;        // MR: rows of x per register tile
constexpr int kTileBlocks = 3;      // NB: 16-column blocks per register tile (8 x 3 accumulators)
constexpr int kSwiGLURows = 6;      // the SwiGLU GEMM's tile: 6 rows x (2 gate + 2 up) blocks
constexpr int64_t kChunkRows = 128; // rows per parallel task: a chunk of x stays in L2 across a strip
// Software prefetch into L2, this many pairs (64-byte lines) ahead in each weight block's stream: with
// few cores the hardware prefetchers alone leave a GEMM of a few rows (decode, verifying drafts)
// short of DRAM bandwidth. bench/gemv.py measures it, weights out of cache.
constexpr int64_t kPrefetchPairs = 40;

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

// v rounded to bf16 (nearest even) and widened back: what a bf16 tensor between two ops holds
__m512 round_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(int32_t(0xffff0000u))));
}

// silu(gate) * up from bf16-valued gate and up, rounded as silu_and_mul rounds (silu to bf16, then
// the product), so that the fused GEMM and the two separate ops agree bit for bit
__m512 swiglu16(__m512 gate, __m512 up) {
  const __m512 e = exp16(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), gate), _mm512_set1_ps(88.f)));
  return _mm512_mul_ps(round_bf16(_mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.f), e))), up);
}
#endif

float swiglu1(float gate, float up) {  // swiglu16 on bf16-valued scalars, unrounded
  return bf16_to_float(float_to_bf16(gate / (1.f + std::exp(-gate)))) * up;
}

#if defined(LAMINA_AVX512) && defined(__AVX512BF16__)
// The register tile behind every bf16 product here (the GEMM, attention's scores and its
// weighted values): acc[R][NB] += a's rows times NB 16-lane blocks of b, one pair of the shared
// dimension per step. Row r's pair p is a[r * lda + 2p, +1], broadcast; block j's pair p is the 32
// bf16 at b + p * pair_stride + j * block_stride (16 outputs x the same pair). Prefetch: b's blocks
// are weight streams read once from memory (the GEMM), fetched kPrefetchPairs pairs ahead.
template <int R, int NB, bool Prefetch = false>
inline void dpbf16_tile(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t pair_stride,
                        int64_t block_stride, int64_t pairs, __m512 (&acc)[R][NB]) {
  for (int64_t p = 0; p < pairs; p++) {
    __m512bh bv[NB];
    for (int j = 0; j < NB; j++) bv[j] = (__m512bh)_mm512_loadu_si512(b + p * pair_stride + j * block_stride);
    if constexpr (Prefetch)  // past a block's end this fetches the next block's start
      for (int j = 0; j < NB; j++)
        _mm_prefetch(reinterpret_cast<const char*>(b + (p + kPrefetchPairs) * pair_stride + j * block_stride),
                     _MM_HINT_T1);
    for (int r = 0; r < R; r++) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * p, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < NB; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], av, bv[j]);
    }
  }
}

// MR rows x NB blocks of x @ W^T, rounded to bf16 once. With SwiGLU the NB blocks are NB/2 gate
// blocks then the NB/2 up blocks of the same channels (pack_bf16_swiglu's order), and y gets
// silu(gate) * up: NB/2 blocks of the intermediate activation.
template <int MR, int NB, bool SwiGLU>
void packed_tile(const uint16_t* x, int64_t K, const uint16_t* w, uint16_t* y, int64_t ldy) {
  __m512 acc[MR][NB];
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();
  dpbf16_tile<MR, NB, true>(x, K, w, 32, K * 16, K / 2, acc);
  for (int i = 0; i < MR; i++) {
    if constexpr (SwiGLU) {
      for (int j = 0; j < NB / 2; j++) {
        const __m512 h = swiglu16(round_bf16(acc[i][j]), round_bf16(acc[i][j + NB / 2]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i * ldy + j * 16), (__m256i)_mm512_cvtneps_pbh(h));
      }
    } else {
      for (int j = 0; j < NB; j++)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i * ldy + j * 16), (__m256i)_mm512_cvtneps_pbh(acc[i][j]));
    }
  }
}

// `rows` rows: whole tiles of MR, then one tile of the rows left
template <int MR, int NB, bool SwiGLU>
void packed_rows(const uint16_t* x, int64_t rows, int64_t K, const uint16_t* w, uint16_t* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + MR <= rows; m += MR) packed_tile<MR, NB, SwiGLU>(x + m * K, K, w, y + m * ldy, ldy);
  if constexpr (MR > 1)
    if (rows > m) packed_rows<MR - 1, NB, SwiGLU>(x + m * K, rows - m, K, w, y + m * ldy, ldy);
}
#endif

// rows x [16 * blocks] of y: the plain path, the same sums in float32 (SwiGLU: as packed_tile)
void packed_rows_plain(const uint16_t* x, int64_t rows, int64_t K, const uint16_t* w, int64_t blocks,
                       uint16_t* y, int64_t ldy, bool swiglu) {
  std::vector<float> acc(16 * blocks);
  for (int64_t m = 0; m < rows; m++) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t b = 0; b < blocks; b++) {
      const uint16_t* wb = w + b * K * 16;
      for (int64_t k = 0; k < K; k++) {
        const float xk = bf16_to_float(x[m * K + k]);
        for (int c = 0; c < 16; c++) acc[b * 16 + c] += xk * bf16_to_float(wb[(k / 2) * 32 + c * 2 + k % 2]);
      }
    }
    const int64_t half = 8 * blocks;  // SwiGLU: gate columns, then as many up columns
    for (int64_t c = 0; c < (swiglu ? half : 16 * blocks); c++)
      y[m * ldy + c] = float_to_bf16(swiglu ? swiglu1(bf16_to_float(float_to_bf16(acc[c])),
                                                      bf16_to_float(float_to_bf16(acc[half + c])))
                                            : acc[c]);
  }
}

// y = x @ W^T (or SwiGLU's silu(x @ G^T) * (x @ U^T)) over tasks of kChunkRows rows x one strip of
// `strip_blocks` weight blocks
at::Tensor packed_gemm(const at::Tensor& x, const at::Tensor& packed, bool swiglu) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 2 && packed.is_contiguous()
              && packed.scalar_type() == at::kBFloat16, "packed weight must be contiguous bfloat16 [N/16, K/2, 16, 2]");
  const int64_t N = packed.size(0) * 16, K = packed.size(1) * 2;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == at::kBFloat16, "x must be bfloat16 [M, ", K, "]");
  TORCH_CHECK(!swiglu || N % 64 == 0, "a SwiGLU weight needs 2 x a multiple of 32 output channels, got ", N);
  const int64_t M = x.size(0), ldy = swiglu ? N / 2 : N;
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "lamina's CPU GEMM takes CPU tensors");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({M, ldy}, x.options());
  auto xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  auto wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  auto yp = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t blocks = N / 16, strip_blocks = swiglu ? 4 : kTileBlocks;
  const int64_t strips = (blocks + strip_blocks - 1) / strip_blocks;
  const int64_t chunks = (M + kChunkRows - 1) / kChunkRows;
  at::parallel_for(0, chunks * strips, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; task++) {
      const int64_t m0 = (task / strips) * kChunkRows, rows = std::min(kChunkRows, M - m0);
      const int64_t b0 = (task % strips) * strip_blocks, nb = std::min<int64_t>(strip_blocks, blocks - b0);
      const uint16_t* xs = xp + m0 * K;
      const uint16_t* ws = wp + b0 * K * 16;
      uint16_t* ys = yp + m0 * ldy + (swiglu ? b0 / 2 : b0) * 16;
#if defined(LAMINA_AVX512) && defined(__AVX512BF16__)
      static_assert(kTileBlocks == 3, "the dispatch below covers 1 to 3 blocks");
      if (swiglu) packed_rows<kSwiGLURows, 4, true>(xs, rows, K, ws, ys, ldy);
      else if (nb == 3) packed_rows<kTileRows, 3, false>(xs, rows, K, ws, ys, ldy);
      else if (nb == 2) packed_rows<kTileRows, 2, false>(xs, rows, K, ws, ys, ldy);
      else packed_rows<kTileRows, 1, false>(xs, rows, K, ws, ys, ldy);
#else
      packed_rows_plain(xs, rows, K, ws, nb, ys, ldy, swiglu);
#endif
    }
  });
  return out;
}

at::Tensor bf16_packed_linear(const at::Tensor& x, const at::Tensor& packed) { return packed_gemm(x, packed, false); }

// x @ [G; U]^T -> silu(x @ G^T) * (x @ U^T) in one pass: the [M, 2I] product never reaches memory
at::Tensor bf16_packed_swiglu(const at::Tensor& x, const at::Tensor& packed) { return packed_gemm(x, packed, true); }

// ---------------------------------------------------------------------------------------------
// Paged decode attention: one new token per sequence attends over its cached K/V, read in place
// through the block table. torch's path gathers each sequence's blocks into a padded copy first, so
// the cache crosses memory three times (read, write, read) instead of once; in a batch of 32
// sequences of a few hundred tokens that traffic is most of a decode step.


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
    if (t + 16 < len)  // as for the keys: a later block may be anywhere
      for (size_t j = 0; j < NV * 16 * sizeof(T); j += 64)
        _mm_prefetch(reinterpret_cast<const char*>(row(v_cache, t + 16)) + j, _MM_HINT_T0);
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
void attend(const float* q, const uint16_t* qb, const T* k_cache, const T* v_cache, const int32_t* table,
            int64_t len, int64_t block_size, int64_t num_kv_heads, int64_t kv_head, int64_t D, int64_t group,
            float scale, float* out, std::vector<float>& scores) {
  scores.resize(group * len);
  auto row = [&](const T* cache, int64_t t) {
    const int64_t slot = int64_t(table[t / block_size]) * block_size + t % block_size;
    return cache + (slot * num_kv_heads + kv_head) * D;
  };
  int64_t t0 = 0;
#if defined(LAMINA_AVX512) && defined(__AVX512BF16__)
  // q in bf16 too (qb: it came out of a bf16 projection): VDPBF16PS takes the pairs as they are
  if constexpr (std::is_same_v<T, uint16_t>)
    if (qb != nullptr)
      for (; t0 + 16 <= len; t0 += 16) {
        // the next 16 keys may sit in another block anywhere in the cache: start fetching them
        for (int64_t i = t0 + 16; i < std::min(t0 + 32, len); i++)
          for (int64_t j = 0; j < D * 2; j += 64) _mm_prefetch(reinterpret_cast<const char*>(row(k_cache, i)) + j, _MM_HINT_T0);
        for (int64_t g = 0; g < group; g++) {
          __m512 part[16];
          for (int i = 0; i < 16; i++) {
            const uint16_t* k = row(k_cache, t0 + i);
            __m512 acc = _mm512_setzero_ps();
            for (int64_t j = 0; j < D; j += 32)
              acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qb + g * D + j), (__m512bh)_mm512_loadu_si512(k + j));
            part[i] = acc;
          }
          _mm512_storeu_ps(scores.data() + g * len + t0, _mm512_mul_ps(_mm512_set1_ps(scale), sum_each(part)));
        }
      }
#endif
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
void decode_attention_typed(const at::Tensor& q, const at::Tensor& q_bf16, const at::Tensor& k_cache, const at::Tensor& v_cache,
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
  const uint16_t* qbp = q_bf16.defined() ? reinterpret_cast<const uint16_t*>(q_bf16.data_ptr()) : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; task++) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const int64_t len = lens[b];
      TORCH_CHECK(len >= 1 && (len + block_size - 1) / block_size <= width, "sequence ", b, " has ", len,
                  " tokens, more than its block table holds");
      attend(qp + (b * Hq + h * group) * D, qbp ? qbp + (b * Hq + h * group) * D : nullptr, k, v, tables + b * width, len, block_size, Hkv, h, D, group,
             float(scale), op + (b * Hq + h * group) * D, scores);
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "q must be float32 or bfloat16 [B, Hq, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type()
              && k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.size(3) == q.size(2),
              "caches must be contiguous [blocks, block_size, Hkv, D] of one dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt
              && block_tables.size(0) == q.size(0) && seq_lens.size(0) == q.size(0),
              "block_tables [B, W] and seq_lens [B] must be int32");
  const at::Tensor qc = q.to(at::kFloat).contiguous(), tables = block_tables.contiguous(), lens = seq_lens.contiguous();
  // bf16 q on a bf16 cache: the scores from bf16 pairs (exact products, float32 sums)
  const bool pairs = q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 && q.size(2) % 32 == 0;
  const at::Tensor qb = pairs ? q.contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(qc);
  if (k_cache.scalar_type() == at::kFloat)
    decode_attention_typed<float>(qc, qb, k_cache, v_cache, tables, lens, scale, out);
  else if (k_cache.scalar_type() == at::kBFloat16)
    decode_attention_typed<uint16_t>(qc, qb, k_cache, v_cache, tables, lens, scale, out);
  else
    TORCH_CHECK(false, "the KV cache must be float32 or bfloat16");
  return out;
}

// ---------------------------------------------------------------------------------------------
// Paged prefill attention (bf16 q and cache): the new tokens of each sequence attend causally over
// its cache, read in place, with an online softmax (flash attention's order) in float32.
//
// A task is one KV head of up to kQueryTile new tokens of one sequence: its query heads (GQA) and
// tokens form the rows of one tile, so each key and value is read once for all of them. Per chunk
// of kKeyChunk keys: the keys are transposed into VDPBF16PS's layout (2 dims of 16 keys per
// load) and the scores come out of bf16 pairs exactly, as float32; the softmax runs in float32 and
// the probabilities meet the values as bf16 pairs too (as in flash attention's bf16 kernels).
// Tasks are spread over the threads longest first, since causal tiles differ in length.

constexpr int64_t kQueryTile = 64;
constexpr int64_t kKeyChunk = 64;

struct PrefillTask {
  int64_t seq, kv_head, first, count;  // new tokens [first, first + count) of the sequence
  int64_t cost;
};

template <typename Row>
void prefill_tile_plain(const uint16_t* qrows, int64_t R, int64_t group, int64_t ctx0, const Row& row,
                        const uint16_t* k_cache, const uint16_t* v_cache, int64_t D, float scale, float* o) {
  std::vector<float> s;
  for (int64_t r = 0; r < R; r++) {
    const int64_t len = ctx0 + r / group + 1;  // keys this row sees
    s.assign(len, 0.f);
    float mx = -INFINITY;
    for (int64_t t = 0; t < len; t++) {
      const uint16_t* k = row(k_cache, t);
      float acc = 0.f;
      for (int64_t d = 0; d < D; d++) acc += bf16_to_float(qrows[r * D + d]) * bf16_to_float(k[d]);
      s[t] = acc * scale;
      mx = std::max(mx, s[t]);
    }
    float sum = 0.f;
    for (int64_t t = 0; t < len; t++) sum += (s[t] = std::exp(s[t] - mx));
    for (int64_t d = 0; d < D; d++) o[r * D + d] = 0.f;
    for (int64_t t = 0; t < len; t++) {
      const uint16_t* v = row(v_cache, t);
      for (int64_t d = 0; d < D; d++) o[r * D + d] += s[t] * bf16_to_float(v[d]);
    }
    for (int64_t d = 0; d < D; d++) o[r * D + d] /= sum;
  }
}

#if defined(LAMINA_AVX512) && defined(__AVX512BF16__)
constexpr int kKeyGroups = kKeyChunk / 16;  // 16-lane groups of keys per chunk

// s[RB][kKeyChunk] = q[RB] . keys, from kt [D/2][kKeyChunk] pairs of dims of each key
template <int RB>
void chunk_scores(const uint16_t* q, const uint32_t* kt, int64_t D, float* s) {
  __m512 acc[RB][kKeyGroups];
  for (int r = 0; r < RB; r++)
    for (int c = 0; c < kKeyGroups; c++) acc[r][c] = _mm512_setzero_ps();
  dpbf16_tile<RB, kKeyGroups>(q, D, reinterpret_cast<const uint16_t*>(kt), 2 * kKeyChunk, 32, D / 2, acc);
  for (int r = 0; r < RB; r++)
    for (int c = 0; c < kKeyGroups; c++) _mm512_storeu_ps(s + r * kKeyChunk + 16 * c, acc[r][c]);
}

// o[RB][16 NV] = o * alpha + p[RB][:len] . v[:len], from bf16 pairs of probabilities and of values
// of two consecutive keys (vp [len/2][16 NV][2])
template <int RB, int NV>
void chunk_values(const uint16_t* p, const float* alpha, const uint16_t* vp, int64_t len, float* o) {
  __m512 acc[RB][NV];
  for (int r = 0; r < RB; r++) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int j = 0; j < NV; j++) acc[r][j] = _mm512_mul_ps(a, _mm512_loadu_ps(o + r * NV * 16 + j * 16));
  }
  dpbf16_tile<RB, NV>(p, kKeyChunk, vp, NV * 32, 32, (len + 1) / 2, acc);
  for (int r = 0; r < RB; r++)
    for (int j = 0; j < NV; j++) _mm512_storeu_ps(o + r * NV * 16 + j * 16, acc[r][j]);
}

template <int RB, int NV>
void values_rows(const uint16_t* p, const float* alpha, const uint16_t* vp, int64_t len, float* o, int64_t R) {
  int64_t r = 0;
  for (; r + RB <= R; r += RB) chunk_values<RB, NV>(p + r * kKeyChunk, alpha + r, vp, len, o + r * NV * 16);
  for (; r < R; r++) chunk_values<1, NV>(p + r * kKeyChunk, alpha + r, vp, len, o + r * NV * 16);
}

// r[i] = 16 dwords of row i -> r[j] = dword j of each row
void transpose16x16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; i++) {  // per 128-bit lane: pairs of rows 2i, 2i+1
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) {  // r[4i + j], 128-bit lane L: dword 4L + j of rows 4i..4i+3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; j++) {  // then a 4 x 4 transpose of 128-bit lanes over r[j], r[4+j], r[8+j], r[12+j]
    const __m512i u0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88), u1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);
    const __m512i u2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88), u3 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
    t[j] = _mm512_shuffle_i32x4(u0, u2, 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(u1, u3, 0x88);
    t[8 + j] = _mm512_shuffle_i32x4(u0, u2, 0xdd);
    t[12 + j] = _mm512_shuffle_i32x4(u1, u3, 0xdd);
  }
  for (int i = 0; i < 16; i++) r[i] = t[i];
}

// Keys t0 .. t0 + len - 1 into the products' layouts: kt [D/2][kKeyChunk], dword (pair of dims) dp
// of key t at dp * kKeyChunk + t, and vp [kKeyChunk/2][D][2], value d of keys 2i and 2i+1 side by
// side. Keys past len are zeros (a masked score; an odd key's partner in the values' pairs).
template <typename Row>
void load_chunk(const Row& row, const uint16_t* k_cache, const uint16_t* v_cache, int64_t t0, int64_t len,
                int64_t D, uint32_t* kt, uint16_t* vp) {
  for (int64_t c = 0; c < kKeyChunk; c += 16) {
    const uint16_t* keys[16];
    for (int i = 0; i < 16; i++) keys[i] = c + i < len ? row(k_cache, t0 + c + i) : nullptr;
    for (int64_t dp = 0; dp < D / 2; dp += 16) {
      __m512i m[16];
      for (int i = 0; i < 16; i++) m[i] = keys[i] ? _mm512_loadu_si512(keys[i] + 2 * dp) : _mm512_setzero_si512();
      transpose16x16(m);
      for (int j = 0; j < 16; j++) _mm512_storeu_si512(kt + (dp + j) * kKeyChunk + c, m[j]);
    }
  }
  alignas(64) static constexpr uint16_t kLow[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i low = _mm512_load_si512(kLow), high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (int64_t t = 0; t < len; t += 2) {
    const uint16_t* a = row(v_cache, t0 + t);
    const uint16_t* b = t + 1 < len ? row(v_cache, t0 + t + 1) : nullptr;
    uint16_t* out = vp + t * D;  // pair t/2
    for (int64_t d = 0; d < D; d += 32) {
      const __m512i va = _mm512_loadu_si512(a + d), vb = b ? _mm512_loadu_si512(b + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + 2 * d, _mm512_permutex2var_epi16(va, low, vb));
      _mm512_storeu_si512(out + 2 * d + 32, _mm512_permutex2var_epi16(va, high, vb));
    }
  }
}

struct TileScratch {
  std::vector<uint32_t> kt;
  std::vector<uint16_t> vp, p;
  std::vector<float> s, m, l, alpha;
};

template <typename Row>
void prefill_tile(const uint16_t* qrows, int64_t R, int64_t group, int64_t ctx0, const Row& row,
                  const uint16_t* k_cache, const uint16_t* v_cache, int64_t D, float scale, float* o,
                  TileScratch& w) {
  w.kt.resize(D / 2 * kKeyChunk);
  w.vp.resize(kKeyChunk * D);
  w.s.resize(R * kKeyChunk);
  w.p.resize(R * kKeyChunk);
  w.m.assign(R, -INFINITY);
  w.l.assign(R, 0.f);
  w.alpha.resize(R);
  std::fill_n(o, R * D, 0.f);
  const int64_t end = ctx0 + (R - 1) / group + 1;  // keys the last row sees
  for (int64_t t0 = 0; t0 < end; t0 += kKeyChunk) {
    const int64_t len = std::min(kKeyChunk, end - t0);
    load_chunk(row, k_cache, v_cache, t0, len, D, w.kt.data(), w.vp.data());
    // the rows that see any key of this chunk: all but the first few tokens' on the first chunks
    const int64_t first_token = std::max<int64_t>(0, t0 - ctx0);
    const int64_t r0 = first_token * group;
    int64_t r = r0;
    for (; r + 6 <= R; r += 6) chunk_scores<6>(qrows + r * D, w.kt.data(), D, w.s.data() + r * kKeyChunk);
    for (; r < R; r++) chunk_scores<1>(qrows + r * D, w.kt.data(), D, w.s.data() + r * kKeyChunk);
    const __m512 neg = _mm512_set1_ps(-INFINITY), vs = _mm512_set1_ps(scale), floor = _mm512_set1_ps(-87.f);
    for (r = r0; r < R; r++) {
      const int64_t visible = std::min(len, ctx0 + r / group + 1 - t0);  // causal: keys up to the row's position
      float* s = w.s.data() + r * kKeyChunk;
      __m512 sc[kKeyGroups];
      __mmask16 mask[kKeyGroups];
      __m512 vmax = neg;
      for (int c = 0; c < kKeyGroups; c++) {
        const int64_t n = std::clamp<int64_t>(visible - 16 * c, 0, 16);
        mask[c] = __mmask16((1u << n) - 1);
        sc[c] = _mm512_mask_mul_ps(neg, mask[c], _mm512_loadu_ps(s + 16 * c), vs);
        vmax = _mm512_max_ps(vmax, sc[c]);
      }
      const float mx = std::max(w.m[r], _mm512_reduce_max_ps(vmax));
      const __m512 vmx = _mm512_set1_ps(mx);
      __m512 vsum = _mm512_setzero_ps();
      uint16_t* pr = w.p.data() + r * kKeyChunk;
      for (int c = 0; c < kKeyGroups; c++) {
        const __m512 e = _mm512_maskz_mov_ps(mask[c], exp16(_mm512_max_ps(_mm512_sub_ps(sc[c], vmx), floor)));
        // the probabilities go into the values' products as bf16 (as in flash attention's bf16
        // kernels); the denominator sums the same rounded values, so the weights sum to one
        const __m256bh eb = _mm512_cvtneps_pbh(e);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + 16 * c), (__m256i)eb);
        vsum = _mm512_add_ps(vsum, _mm512_cvtpbh_ps(eb));
      }
      w.alpha[r] = std::exp(w.m[r] - mx);  // 0 on the first chunk (m = -inf)
      w.l[r] = w.l[r] * w.alpha[r] + _mm512_reduce_add_ps(vsum);
      w.m[r] = mx;
    }
    float* orows = o + r0 * D;
    const uint16_t* p = w.p.data() + r0 * kKeyChunk;
    if (D == 64) values_rows<6, 4>(p, w.alpha.data() + r0, w.vp.data(), len, orows, R - r0);
    else values_rows<3, 8>(p, w.alpha.data() + r0, w.vp.data(), len, orows, R - r0);  // D == 128
  }
  for (int64_t r = 0; r < R; r++) {
    const float inv = 1.f / w.l[r];
    for (int64_t d = 0; d < D; d++) o[r * D + d] *= inv;
  }
}
#endif

at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                                   const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kBFloat16, "q must be bfloat16 [T, Hq, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == at::kBFloat16
              && v_cache.scalar_type() == at::kBFloat16 && k_cache.is_contiguous() && v_cache.is_contiguous()
              && k_cache.size(3) == q.size(2),
              "caches must be contiguous bfloat16 [blocks, block_size, Hkv, D]");
  TORCH_CHECK(q.size(2) == 64 || q.size(2) == 128, "head_dim must be 64 or 128");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of KV heads");
  const int64_t B = seq_lens.size(0);
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt
              && query_start_loc.scalar_type() == at::kInt && block_tables.size(0) == B
              && query_start_loc.size(0) == B + 1,
              "block_tables [B, W], query_start_loc [B+1] and seq_lens [B] must be int32");
  const at::Tensor qc = q.contiguous(), tables = block_tables.contiguous();
  const at::Tensor qsl = query_start_loc.contiguous(), lens_t = seq_lens.contiguous();
  const int64_t Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2), group = Hq / Hkv;
  const int64_t block_size = k_cache.size(1), width = tables.size(1);
  const int32_t* starts = qsl.data_ptr<int32_t>();
  const int32_t* lens = lens_t.data_ptr<int32_t>();
  TORCH_CHECK(starts[0] == 0 && starts[B] == q.size(0), "query_start_loc must run from 0 to T");
  std::vector<PrefillTask> tasks;
  for (int64_t b = 0; b < B; b++) {
    const int64_t n = starts[b + 1] - starts[b], ctx0 = lens[b] - n;
    TORCH_CHECK(n >= 0 && ctx0 >= 0 && (lens[b] + block_size - 1) / block_size <= width,
                "sequence ", b, ": ", n, " new tokens, ", lens[b], " in all, a block table of ", width);
    for (int64_t h = 0; h < Hkv; h++)
      for (int64_t i = 0; i < n; i += kQueryTile) {
        const int64_t count = std::min(kQueryTile, n - i);
        tasks.push_back({b, h, i, count, count * (ctx0 + i + count)});
      }
  }
  // longest first onto the least loaded thread
  std::sort(tasks.begin(), tasks.end(), [](const PrefillTask& a, const PrefillTask& b) { return a.cost > b.cost; });
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks.size()));
  std::vector<std::vector<PrefillTask>> bins(threads);
  std::vector<int64_t> load(threads, 0);
  for (const PrefillTask& t : tasks) {
    const int64_t i = std::min_element(load.begin(), load.end()) - load.begin();
    bins[i].push_back(t);
    load[i] += t.cost;
  }
  at::Tensor out = at::empty_like(qc);
  auto qp = reinterpret_cast<const uint16_t*>(qc.data_ptr());
  auto op = reinterpret_cast<uint16_t*>(out.data_ptr());
  auto kc = reinterpret_cast<const uint16_t*>(k_cache.data_ptr());
  auto vc = reinterpret_cast<const uint16_t*>(v_cache.data_ptr());
  const int32_t* tp = tables.data_ptr<int32_t>();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> qrows;
    std::vector<float> o;
#if defined(LAMINA_AVX512) && defined(__AVX512BF16__)
    TileScratch scratch;
#endif
    for (int64_t bin = begin; bin < end; bin++)
      for (const PrefillTask& t : bins[bin]) {
        const int64_t R = t.count * group, ctx0 = lens[t.seq] - (starts[t.seq + 1] - starts[t.seq]) + t.first;
        const int32_t* table = tp + t.seq * width;
        auto row = [&](const uint16_t* cache, int64_t pos) {
          const int64_t slot = int64_t(table[pos / block_size]) * block_size + pos % block_size;
          return cache + (slot * Hkv + t.kv_head) * D;
        };
        qrows.resize(R * D);
        o.resize(R * D);
        for (int64_t i = 0; i < t.count; i++)  // rows: token-major, then the KV head's query heads
          std::memcpy(&qrows[i * group * D], qp + ((starts[t.seq] + t.first + i) * Hq + t.kv_head * group) * D,
                      group * D * sizeof(uint16_t));
#if defined(LAMINA_AVX512) && defined(__AVX512BF16__)
        prefill_tile(qrows.data(), R, group, ctx0, row, kc, vc, D, float(scale), o.data(), scratch);
#else
        prefill_tile_plain(qrows.data(), R, group, ctx0, row, kc, vc, D, float(scale), o.data());
#endif
        for (int64_t i = 0; i < t.count; i++) {
          uint16_t* dst = op + ((starts[t.seq] + t.first + i) * Hq + t.kv_head * group) * D;
          const float* src = o.data() + i * group * D;
          int64_t j = 0;
#if defined(LAMINA_AVX512) && defined(__AVX512BF16__)
          for (; j + 16 <= group * D; j += 16)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + j)));
#endif
          for (; j < group * D; j++) dst[j] = float_to_bf16(src[j]);
        }
      }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Elementwise ops of an eager (prefill) step on bf16 rows, rounding where torch's bf16 ops round,
// in one pass where torch makes several (a compiled step fuses them itself and keeps torch's).

#ifdef LAMINA_AVX512
__m512 bf16x16_load(const uint16_t* p) { return load16(p); }
void bf16x16_store(uint16_t* p, __m512 v) {  // round to nearest even, as torch does
  const __m512i u = _mm512_srli_epi32(_mm512_castps_si512(round_bf16(v)), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(u));
}
#endif

// silu(gate) * up for x = [gate | up] rows [T, 2I] -> [T, I]
at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0 && x.scalar_type() == at::kBFloat16, "x must be bfloat16 [T, 2I]");
  const at::Tensor xc = x.contiguous();
  const int64_t T = x.size(0), I = x.size(1) / 2;
  at::Tensor out = at::empty({T, I}, x.options());
  auto xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  auto op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      const uint16_t* g = xp + t * 2 * I;
      const uint16_t* u = g + I;
      uint16_t* o = op + t * I;
      int64_t i = 0;
#ifdef LAMINA_AVX512
      for (; i + 16 <= I; i += 16) bf16x16_store(o + i, swiglu16(bf16x16_load(g + i), bf16x16_load(u + i)));
#endif
      for (; i < I; i++) o[i] = float_to_bf16(swiglu1(bf16_to_float(g[i]), bf16_to_float(u[i])));
    }
  });
  return out;
}

// RMSNorm of one bf16 row h [H] (the norm in float32, rounded to bf16, times the bf16 weight), as
// the reference rounds it. The sum of squares runs in the same order for every row, whichever rows
// share the call (batch-invariant mode relies on it).
void rms_norm_row(const uint16_t* h, const uint16_t* wp, uint16_t* orow, int64_t H, double eps) {
  float ss = 0.f;
  int64_t i = 0;
#ifdef LAMINA_AVX512
  __m512 vss = _mm512_setzero_ps();
  for (; i + 16 <= H; i += 16) {
    const __m512 v = bf16x16_load(h + i);
    vss = _mm512_fmadd_ps(v, v, vss);
  }
  ss = _mm512_reduce_add_ps(vss);
#endif
  for (; i < H; i++) ss += bf16_to_float(h[i]) * bf16_to_float(h[i]);
  const float inv = 1.f / std::sqrt(ss / float(H) + float(eps));
  i = 0;
#ifdef LAMINA_AVX512
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; i + 16 <= H; i += 16) {
    uint16_t normed[16];
    bf16x16_store(normed, _mm512_mul_ps(bf16x16_load(h + i), vinv));
    bf16x16_store(orow + i, _mm512_mul_ps(bf16x16_load(wp + i), bf16x16_load(normed)));
  }
#endif
  for (; i < H; i++)
    orow[i] = float_to_bf16(bf16_to_float(wp[i]) * bf16_to_float(float_to_bf16(bf16_to_float(h[i]) * inv)));
}

void check_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16
              && weight.dim() == 1 && weight.size(0) == x.size(1),
              "x must be bfloat16 [T, H], weight bfloat16 [H]");
}

// RMSNorm of bf16 rows after the residual add: x + residual in bf16 (the new residual stream), then
// rms_norm_row of it.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == at::kBFloat16,
              "residual must be bfloat16 shaped like x");
  const int64_t T = x.size(0), H = x.size(1);
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty({T, H}, x.options()), sum = at::empty({T, H}, x.options());
  auto xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  auto rp = reinterpret_cast<const uint16_t*>(rc.data_ptr());
  auto wp = reinterpret_cast<const uint16_t*>(wc.data_ptr());
  auto sp = reinterpret_cast<uint16_t*>(sum.data_ptr());
  auto op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      const uint16_t *xr = xp + t * H, *rr = rp + t * H;
      uint16_t* sr = sp + t * H;
      int64_t i = 0;
#ifdef LAMINA_AVX512
      for (; i + 16 <= H; i += 16) bf16x16_store(sr + i, _mm512_add_ps(bf16x16_load(xr + i), bf16x16_load(rr + i)));
#endif
      for (; i < H; i++) sr[i] = float_to_bf16(bf16_to_float(xr[i]) + bf16_to_float(rr[i]));
      rms_norm_row(sr, wp, op + t * H, H, eps);
    }
  });
  return {out, sum};
}

// RMSNorm of bf16 rows with no residual to add (a model's first norm)
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  const int64_t T = x.size(0), H = x.size(1);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty({T, H}, x.options());
  auto xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  auto wp = reinterpret_cast<const uint16_t*>(wc.data_ptr());
  auto op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) rms_norm_row(xp + t * H, wp, op + t * H, H, eps);
  });
  return out;
}

}  // namespace

// A macro layer, so that a test can build the plain paths under another namespace.
#define LAMINA_DEFINE_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
LAMINA_DEFINE_LIBRARY(LAMINA_NAMESPACE, m) {
  m.def("bf16_packed_linear(Tensor x, Tensor packed) -> Tensor");
  m.def("paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor query_start_loc, Tensor seq_lens, float scale) -> Tensor");
  m.def("bf16_packed_swiglu(Tensor x, Tensor packed) -> Tensor");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, float scale) -> Tensor");
  m.impl("bf16_packed_linear", c10::DispatchKey::CPU, TORCH_FN(bf16_packed_linear));
  m.impl("paged_prefill_attention", c10::DispatchKey::CPU, TORCH_FN(paged_prefill_attention));
  m.impl("bf16_packed_swiglu", c10::DispatchKey::CPU, TORCH_FN(bf16_packed_swiglu));
  m.impl("silu_and_mul", c10::DispatchKey::CPU, TORCH_FN(silu_and_mul));
  m.impl("add_rms_norm", c10::DispatchKey::CPU, TORCH_FN(add_rms_norm));
  m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
  m.impl("paged_decode_attention", c10::DispatchKey::CPU, TORCH_FN(paged_decode_attention));
}
