// lamina's quantized matmuls for a few rows of x (decode batches) on CPU, on AVX-512 VNNI:
//   int4_packed_linear  weight in llama.cpp's Q4_1 grid: per output channel n and group g of 32
//                       input channels, w = code * d + m, code in 0..15
//   int8_packed_linear  weight int8 with one scale per output channel: w = q * s
// Decoding is bound by the weight bytes each token reads, so both read the weight once, in a layout
// packed at load time that streams linearly, and multiply integers: x is rounded to int8 per row
// and group of 32 (scale dx = max|x| / 127, as llama.cpp's Q8_1), and VPDPBUSD multiplies unsigned
// weight bytes by signed activation bytes, 4 products per 32-bit lane. Per group:
//   int4:  sum_k w_k x_k ~= d dx sum_k code_k qx_k + m dx sum_k qx_k
//   int8:  sum_k w_k x_k ~= s dx (sum_k (q_k + 128) qx_k - 128 sum_k qx_k)   (q + 128 is unsigned)
// The min/offset terms take the rounded activations too (as llama.cpp does): the error is then
// sum_k w_k e_k (e the activation's rounding error), half what the exact float sum would leave.
//
// Rounding x to one int8 adds visible relative error to each output, which moves a model's logprobs
// measurably further from bf16 than torch's own int4/int8 kernels (tests/test_accuracy.py). So x is rounded to two
// int8 parts (split): q1 as above, then the remainder x - dx1 q1 the same way, x ~= dx1 q1 + dx2 q2
// to ~16 bits. Both parts meet each weight load and are summed in registers; the second VPDPBUSD
// hides under the memory stream at one row, and costs more from 4 rows up.
//
// Packed layouts: blocks of 16 output channels (one 512-bit lane each), each block its groups in
// order, so a tile reads memory linearly.
//   int4, uint8 [N/16, K/32, 320] per block and group:
//     bytes   0..255  four 64-byte vectors j; lane c byte b: low nibble code(c, 4j + b), high
//                     nibble code(c, 16 + 4j + b) (Q4_1's order: low nibbles the first 16 values)
//     bytes 256..319  16 x 32-bit lanes: low half bf16 d_c, high half bf16 m_c
//     = 5 bits per weight. One vector, masked and shifted, is two VPDPBUSD operands.
//   int8, uint8 [N/16, K/32, 512] per block and group: eight 64-byte vectors j; lane c byte b =
//     q(c, 4j + b) + 128. The scales, float32 [N], are a separate tensor.
#include "cpu_common.h"

#if defined(LAMINA_AVX512) && defined(__AVX512VNNI__)
#define LAMINA_VNNI 1
#endif

namespace {

constexpr int64_t kGroup = 32;          // input channels per activation scale (and int4 d, m)
constexpr int64_t kBlock = 16;          // output channels per block
constexpr int64_t kGrainBlocks = 4;     // blocks per parallel task, at least (64 channels)
constexpr int kTileRows = 8;            // rows of quantized x per register tile, at most
// Software prefetch into L2, this far ahead in each weight stream: with few cores the hardware
// prefetchers alone leave a decode GEMV short of DRAM bandwidth (prefetching into L1 instead is
// slower). bench/gemv.py measures it, weights out of cache.
constexpr int64_t kPrefetchBytes = 2560;

template <int Bits>
constexpr int64_t group_bytes() { return Bits == 4 ? 320 : 512; }

// x's rows rounded to int8 per group of 32: q [rows, K], and per group dx and dx * sum(q)
// [rows, K/32]. With split, row m of x becomes rows 2m and 2m + 1 (its two parts).
struct QuantRows {
  std::vector<int8_t> q;
  std::vector<float> d, sum;
};

// 32 values (v, overwritten with the remainder) -> q, scale, scale * sum(q). Rounding to nearest
// even (VCVTPS2DQ's, and std::nearbyint's), as llama.cpp's quantize_row_q8_1.
void quantize_group_plain(float* v, int8_t* q, float& d_out, float& sum_out) {
  float amax = 0.f;
  for (int k = 0; k < kGroup; k++) amax = std::max(amax, std::fabs(v[k]));
  const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
  int32_t sum = 0;
  for (int k = 0; k < kGroup; k++) {
    q[k] = int8_t(std::nearbyint(v[k] * id));
    sum += q[k];
    v[k] = std::fma(-float(q[k]), d, v[k]);
  }
  d_out = d;
  sum_out = d * float(sum);
}

#ifdef LAMINA_VNNI
__m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// quantize_group_plain on two registers of 16
void quantize_group(__m512& a, __m512& b, int8_t* q, float& d_out, float& sum_out) {
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
  const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));
  const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(id)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(qa));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(qb));
  d_out = d;
  sum_out = d * float(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
  a = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(qa), _mm512_set1_ps(d), a);
  b = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(qb), _mm512_set1_ps(d), b);
}
#endif

template <typename T>
void quantize_rows_into(const T* x, int64_t M, int64_t K, bool split, QuantRows& r) {
  const int64_t G = K / kGroup, parts = split ? 2 : 1;
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < G; g++) {
      const T* v = x + m * K + g * kGroup;
#ifdef LAMINA_VNNI
      __m512 a = load16(v), b = load16(v + 16);
      for (int64_t p = 0; p < parts; p++) {
        const int64_t row = m * parts + p;
        quantize_group(a, b, r.q.data() + row * K + g * kGroup, r.d[row * G + g], r.sum[row * G + g]);
      }
#else
      float f[kGroup];
      for (int k = 0; k < kGroup; k++) f[k] = load_float(v[k]);
      for (int64_t p = 0; p < parts; p++) {
        const int64_t row = m * parts + p;
        quantize_group_plain(f, r.q.data() + row * K + g * kGroup, r.d[row * G + g], r.sum[row * G + g]);
      }
#endif
    }
}

QuantRows quantize_rows(const at::Tensor& x, bool split) {
  const at::Tensor c = x.scalar_type() == at::kBFloat16 ? x.contiguous() : x.contiguous().to(at::kFloat);
  const int64_t M = c.size(0), K = c.size(1), rows = split ? 2 * M : M;
  QuantRows r{std::vector<int8_t>(rows * K), std::vector<float>(rows * K / kGroup),
              std::vector<float>(rows * K / kGroup)};
  if (c.scalar_type() == at::kBFloat16)
    quantize_rows_into(reinterpret_cast<const uint16_t*>(c.data_ptr()), M, K, split, r);
  else
    quantize_rows_into(c.data_ptr<float>(), M, K, split, r);
  return r;
}

// What a tile needs besides its weights: the quantized rows and the output
struct TileArgs {
  int64_t block_bytes, G, K, N;
  const int8_t* qx;
  const float *dx, *sx;
  const float* scale;  // int8: per output channel (already offset to the tile's first channel)
};

void store_out(float* y, int64_t i, float v) { y[i] = v; }
void store_out(uint16_t* y, int64_t i, float v) { y[i] = float_to_bf16(v); }

#ifdef LAMINA_VNNI
void store16(float* y, __m512 v) { _mm512_storeu_ps(y, v); }
void store16(uint16_t* y, __m512 v) {  // round to nearest even, as torch does
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), (__m256i)_mm512_cvtneps_pbh(v));
}

// R rows x NB blocks (16 * NB output channels) of y, over all of K. Each weight vector is loaded
// (and for int4 unpacked) once and meets all R rows; NB blocks give a single row independent
// dependency chains. Split: rows 2i and 2i+1 are the two parts of one row of x, added into y's row i.
template <int Bits, int R, int NB, bool Split, typename T>
void tile(const uint8_t* w, const TileArgs& a, T* y) {
  constexpr int64_t kBytes = group_bytes<Bits>();
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  __m512 acc[R][NB];
  for (int r = 0; r < R; r++)
    for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.G; g++) {
    const uint8_t* wg = w + g * kBytes;
    const int8_t* xg = a.qx + g * kGroup;
    for (int b = 0; b < NB; b++)  // past the block's end this fetches the next block's start
      for (int64_t l = 0; l < kBytes; l += 64)
        _mm_prefetch(reinterpret_cast<const char*>(wg + b * a.block_bytes + kPrefetchBytes + l), _MM_HINT_T1);
    __m512i dot[R][NB];
    for (int r = 0; r < R; r++)
      for (int b = 0; b < NB; b++) dot[r][b] = _mm512_setzero_si512();
    // per 64-byte vector j: (weight operand, its 4 input channels' offset in the group)
    constexpr int kVectors = Bits == 4 ? 4 : 8;
    for (int j = 0; j < kVectors; j++) {
      __m512i lo[NB], hi[NB];
      for (int b = 0; b < NB; b++) {
        const __m512i v = _mm512_loadu_si512(wg + b * a.block_bytes + j * 64);
        if constexpr (Bits == 4) {
          lo[b] = _mm512_and_si512(v, nibble);
          hi[b] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        } else {
          lo[b] = v;
        }
      }
      for (int r = 0; r < R; r++) {
        int32_t x0;
        std::memcpy(&x0, xg + r * a.K + 4 * j, 4);
        const __m512i xa = _mm512_set1_epi32(x0);
        for (int b = 0; b < NB; b++) dot[r][b] = _mm512_dpbusd_epi32(dot[r][b], lo[b], xa);
        if constexpr (Bits == 4) {
          int32_t x1;
          std::memcpy(&x1, xg + r * a.K + 16 + 4 * j, 4);
          const __m512i xc = _mm512_set1_epi32(x1);
          for (int b = 0; b < NB; b++) dot[r][b] = _mm512_dpbusd_epi32(dot[r][b], hi[b], xc);
        }
      }
    }
    if constexpr (Bits == 4) {
      const __m512i high_half = _mm512_set1_epi32(int32_t(0xffff0000u));
      for (int b = 0; b < NB; b++) {
        const __m512i s = _mm512_loadu_si512(wg + b * a.block_bytes + 256);
        const __m512 d = _mm512_castsi512_ps(_mm512_slli_epi32(s, 16));
        const __m512 m = _mm512_castsi512_ps(_mm512_and_si512(s, high_half));
        for (int r = 0; r < R; r++) {
          const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(dot[r][b]), _mm512_set1_ps(a.dx[r * a.G + g]));
          acc[r][b] = _mm512_fmadd_ps(scaled, d, acc[r][b]);
          acc[r][b] = _mm512_fmadd_ps(m, _mm512_set1_ps(a.sx[r * a.G + g]), acc[r][b]);
        }
      }
    } else {  // the channel scale comes at the end; here dx (dot - 128 sum q)
      for (int r = 0; r < R; r++) {
        const __m512 dx = _mm512_set1_ps(a.dx[r * a.G + g]), offset = _mm512_set1_ps(128.f * a.sx[r * a.G + g]);
        for (int b = 0; b < NB; b++)
          acc[r][b] = _mm512_sub_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][b]), dx, acc[r][b]), offset);
      }
    }
  }
  if constexpr (Bits == 8)
    for (int b = 0; b < NB; b++) {
      const __m512 s = _mm512_loadu_ps(a.scale + b * kBlock);
      for (int r = 0; r < R; r++) acc[r][b] = _mm512_mul_ps(acc[r][b], s);
    }
  constexpr int kOut = Split ? R / 2 : R;
  for (int r = 0; r < kOut; r++)
    for (int b = 0; b < NB; b++)
      store16(y + r * a.N + b * kBlock, Split ? _mm512_add_ps(acc[2 * r][b], acc[2 * r + 1][b]) : acc[r][b]);
}

// One to three rows: 4 blocks per tile, so a single row has 4 independent chains (and prefetch
// streams). From 4 rows the tile is compute-bound and 1 block is fastest (bench/gemv.py, NB 1-4 per
// row count).
constexpr int blocks_for(int rows) { return rows <= 3 ? 4 : 1; }

template <int Bits, int R, bool Split, typename T>
void tile_rows(const uint8_t* w, int64_t b0, int64_t b1, TileArgs a, T* y) {
  constexpr int NB = blocks_for(R);
  const float* scale = a.scale;
  int64_t b = b0;
  for (; b + NB <= b1; b += NB) {
    a.scale = scale ? scale + b * kBlock : nullptr;
    tile<Bits, R, NB, Split>(w + b * a.block_bytes, a, y + b * kBlock);
  }
  for (; b < b1; b++) {
    a.scale = scale ? scale + b * kBlock : nullptr;
    tile<Bits, R, 1, Split>(w + b * a.block_bytes, a, y + b * kBlock);
  }
}

template <int Bits, bool Split, typename T>
void tile_dispatch(int64_t rows, const uint8_t* w, int64_t b0, int64_t b1, const TileArgs& a, T* y) {
  switch (rows) {  // rows of quantized x: always even when split
    case 8: return tile_rows<Bits, 8, Split>(w, b0, b1, a, y);
    case 6: return tile_rows<Bits, 6, Split>(w, b0, b1, a, y);
    case 4: return tile_rows<Bits, 4, Split>(w, b0, b1, a, y);
    case 2: return tile_rows<Bits, 2, Split>(w, b0, b1, a, y);
  }
  if constexpr (!Split) {
    switch (rows) {
      case 7: return tile_rows<Bits, 7, false>(w, b0, b1, a, y);
      case 5: return tile_rows<Bits, 5, false>(w, b0, b1, a, y);
      case 3: return tile_rows<Bits, 3, false>(w, b0, b1, a, y);
      case 1: return tile_rows<Bits, 1, false>(w, b0, b1, a, y);
    }
  }
}
#endif

// The plain path: the same integer sums and float32 scaling, one channel at a time
template <int Bits, typename T>
void blocks_plain(const uint8_t* w, int64_t b0, int64_t b1, const TileArgs& a, int64_t rows, bool split, T* y) {
  const int64_t parts = split ? 2 : 1;
  for (int64_t r = 0; r < rows; r += parts)
    for (int64_t b = b0; b < b1; b++)
      for (int c = 0; c < kBlock; c++) {
        float out = 0.f;
        for (int64_t part = r; part < r + parts; part++) {
          float acc = 0.f;
          for (int64_t g = 0; g < a.G; g++) {
            const uint8_t* wg = w + b * a.block_bytes + g * group_bytes<Bits>();
            const int8_t* xg = a.qx + part * a.K + g * kGroup;
            int32_t dot = 0;
            for (int j = 0; j < (Bits == 4 ? 4 : 8); j++)
              for (int i = 0; i < 4; i++) {
                const uint8_t byte = wg[j * 64 + c * 4 + i];
                if (Bits == 4)
                  dot += int32_t(byte & 15) * xg[4 * j + i] + int32_t(byte >> 4) * xg[16 + 4 * j + i];
                else
                  dot += int32_t(byte) * xg[4 * j + i];
              }
            const float dx = a.dx[part * a.G + g], sx = a.sx[part * a.G + g];
            if (Bits == 4) {
              uint16_t d, m;
              std::memcpy(&d, wg + 256 + c * 4, 2);
              std::memcpy(&m, wg + 256 + c * 4 + 2, 2);
              acc = std::fma(float(dot) * dx, bf16_to_float(d), acc);
              acc = std::fma(bf16_to_float(m), sx, acc);
            } else {
              acc = std::fma(float(dot), dx, acc) - 128.f * sx;
            }
          }
          out += Bits == 4 ? acc : acc * a.scale[b * kBlock + c];
        }
        store_out(y, r / parts * a.N + b * kBlock + c, out);
      }
}

// y [M, N] = x [M, K] times the packed weight [N/16, K/32, group_bytes]
template <int Bits>
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const float* scale, bool split) {
  const int64_t blocks = packed.size(0), G = packed.size(1), N = blocks * kBlock, K = G * kGroup, M = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, ", K, "], got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "lamina's CPU kernels take CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "x must be bfloat16 or float32");
  const QuantRows xq = quantize_rows(x, split);
  at::Tensor out = at::empty({M, N}, x.options());
  const int64_t rows_of_x = split ? 2 * M : M;
  const uint8_t* w = packed.data_ptr<uint8_t>();
  auto run = [&](auto* y) {
    at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
      // tiles of up to 8 quantized rows: a block range's weights (a few KB per block) stay in
      // L1/L2 between the tiles of a bigger batch
      for (int64_t m0 = 0; m0 < rows_of_x; m0 += kTileRows) {
        const int64_t rows = std::min<int64_t>(kTileRows, rows_of_x - m0);
        const TileArgs a{G * group_bytes<Bits>(), G, K, N, xq.q.data() + m0 * K, xq.d.data() + m0 * G,
                         xq.sum.data() + m0 * G, scale};
        auto* ym = y + (split ? m0 / 2 : m0) * N;
#ifdef LAMINA_VNNI
        if (split) tile_dispatch<Bits, true>(rows, w, b0, b1, a, ym);
        else tile_dispatch<Bits, false>(rows, w, b0, b1, a, ym);
#else
        blocks_plain<Bits>(w, b0, b1, a, rows, split, ym);
#endif
      }
    });
  };
  if (x.scalar_type() == at::kFloat) run(out.data_ptr<float>());
  else run(reinterpret_cast<uint16_t*>(out.data_ptr()));
  return out;
}

void check_packed(const at::Tensor& packed, int64_t bytes, const char* what) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == bytes && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              what, " weight must be contiguous uint8 [N/16, K/32, ", bytes, "]");
}

at::Tensor int4_packed_linear(const at::Tensor& x, const at::Tensor& packed, bool split_x) {
  check_packed(packed, group_bytes<4>(), "packed int4");
  return packed_linear<4>(x, packed, nullptr, split_x);
}

at::Tensor int8_packed_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, bool split_x) {
  check_packed(packed, group_bytes<8>(), "packed int8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == packed.size(0) * kBlock,
              "int8 scale must be contiguous float32 [N]");
  return packed_linear<8>(x, packed, scale.data_ptr<float>(), split_x);
}

}  // namespace

#define LAMINA_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
LAMINA_LIBRARY_FRAGMENT(LAMINA_NAMESPACE, m) {
  m.def("int4_packed_linear(Tensor x, Tensor packed, bool split_x=True) -> Tensor");
  m.def("int8_packed_linear(Tensor x, Tensor packed, Tensor scale, bool split_x=True) -> Tensor");
  m.impl("int4_packed_linear", c10::DispatchKey::CPU, TORCH_FN(int4_packed_linear));
  m.impl("int8_packed_linear", c10::DispatchKey::CPU, TORCH_FN(int8_packed_linear));
}
