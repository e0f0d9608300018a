// Weight-only quantized matmul for 1 to 64 rows (and more, in chunks of 64): exact, flat and
// batch-invariant by construction. See genrefine/kernels/__init__.py for the layout and the
// arithmetic every path (and the pure-PyTorch fallback) follows to the bit.
//
// Per output (row m of x, output row n), over sub-blocks j of `group` weights:
//   I_j = sum_i (q_i - zero) * xq_i          (integers: exact in any order)
//   X_j = sum_i xq_i
//   t   = a_j * float(I_j);  if offsets: t = t - c_j * float(X_j)
//   acc = acc + dx_b * t                     (b: the 32-wide activation block holding j; j ascending)
// xq, dx: x quantized per row and 32-wide block: dx = amax / 127, xq = round_half_even(x * (1/dx)).
// Compiled with -ffp-contract=off so no multiply-add is fused: every path rounds the same way.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cfloat>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <vector>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int LANES = 16;   // output rows interleaved per group
constexpr int XBLOCK = 32;  // activation quantization block
constexpr int MCHUNK = 64;  // rows of x accumulated at once

struct Args {
  const int8_t* xq;     // [M, K]
  const float* dx;      // [M, K / 32]
  const int32_t* xs;    // [M, K / 16]: sums of xq per 16
  const uint8_t* w;     // [NG, NB, G / 4, 16, 4]
  const float* a;       // [NG, NB, 16] (null when the scales are half precision: ah)
  const float* c;       // [NG, NB, 16] or null
  float* out;           // [M, N]
  int64_t M, K, N, NB;
  int zero;
  int bits = 8;     // 8: the byte layout; 4 or 5: narrow (see narrow_block in __init__.py)
  const uint16_t* ah = nullptr;  // [NG, NB, 16] float16 scales (exactly the file's), else null
  int64_t BB = 0;   // bytes per (group, sub-block)
  // per row and sub-block, computed once per call: (zero, or 128 for signed bytes) * X, float(X),
  // and the activation scale of the sub-block's 32-wide block
  const int32_t* zx = nullptr;  // [M, NB]
  const float* xf = nullptr;    // [M, NB]
  const float* dj = nullptr;    // [M, NB]
};

// The bytes of sub-block j of group g in the byte layout [S][16][4]: the stored bytes themselves,
// or, for narrow values, unpacked into `scratch` (S * 64 bytes): vector h < S/2 is the low nibble
// of the stored vector h, vector h + S/2 its high nibble; a fifth bit comes from 8 bytes per vector.
template <int G>
inline const uint8_t* block_ptr(const Args& p, int64_t g, int64_t j, uint8_t* scratch) {
  constexpr int S = G / 4;
  const uint8_t* src = p.w + (g * p.NB + j) * p.BB;
  if (p.bits == 8) return src;
  for (int h = 0; h < S / 2; ++h)
    for (int i = 0; i < 64; ++i) {
      const uint8_t b = src[h * 64 + i];
      scratch[h * 64 + i] = b & 15;
      scratch[(h + S / 2) * 64 + i] = b >> 4;
    }
  if (p.bits == 5) {
    // each fifth-bit byte -> 8 bytes of 0 or 16 (byte t from bit t), from a table
    static const auto spread = [] {
      std::array<uint64_t, 256> t{};
      for (int v = 0; v < 256; ++v)
        for (int b = 0; b < 8; ++b)
          if ((v >> b) & 1) t[v] |= uint64_t(16) << (8 * b);
      return t;
    }();
    const uint8_t* hb = src + S * 32;
    for (int b = 0; b < S * 8; ++b) {
      uint64_t x;
      std::memcpy(&x, scratch + b * 8, 8);
      x |= spread[hb[b]];
      std::memcpy(scratch + b * 8, &x, 8);
    }
  }
  return scratch;
}

// float16 -> float32, exact (the scales of Q8_0 and Q5_0 are float16 in the file)
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400) == 0);
      bits = sign | (uint32_t(127 - 15 - e) << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// the 16 scales of (group, sub-block) `at` = g * NB + j, as float32
inline void scales16(const Args& p, int64_t at, float* out) {
  if (p.ah)
    for (int r = 0; r < LANES; ++r) out[r] = half_to_float(p.ah[at * LANES + r]);
  else
    std::memcpy(out, p.a + at * LANES, LANES * sizeof(float));
}

inline int xsum(const Args& p, int64_t m, int64_t j, int G) {
  const int32_t* xs = p.xs + m * (p.K / 16);
  return G == 32 ? xs[2 * j] + xs[2 * j + 1] : xs[j];
}

inline void store_lanes(const Args& p, const float* acc, int64_t m0, int64_t mc, int64_t g) {
  const int64_t n0 = g * LANES;
  const int64_t nv = std::min<int64_t>(LANES, p.N - n0);
  for (int64_t m = 0; m < mc; ++m)
    std::memcpy(p.out + (m0 + m) * p.N + n0, acc + m * LANES, nv * sizeof(float));
}

// ---------------------------------------------------------------- generic (any x86-64)
template <int G, bool SIGNED, bool HASC>
void groups_generic(const Args& p, int64_t g0, int64_t g1) {
  constexpr int S = G / 4;
  alignas(64) float acc[MCHUNK * LANES];
  alignas(64) uint8_t scratch[S * 64];
  const int zz = SIGNED ? 0 : p.zero;
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t m0 = 0; m0 < p.M; m0 += MCHUNK) {
      const int64_t mc = std::min<int64_t>(MCHUNK, p.M - m0);
      std::fill(acc, acc + mc * LANES, 0.0f);
      for (int64_t j = 0; j < p.NB; ++j) {
        const uint8_t* wp = block_ptr<G>(p, g, j, scratch);
        float ap[LANES];
        scales16(p, g * p.NB + j, ap);
        const float* cp = HASC ? p.c + (g * p.NB + j) * LANES : nullptr;
        for (int64_t m = 0; m < mc; ++m) {
          const int64_t row = m0 + m;
          const int8_t* xp = p.xq + row * p.K + j * G;
          const int X = xsum(p, row, j, G);
          const float d = p.dx[row * (p.K / XBLOCK) + (j * G) / XBLOCK];
          float* ac = acc + m * LANES;
          for (int r = 0; r < LANES; ++r) {
            int32_t I = 0;
            for (int s = 0; s < S; ++s)
              for (int t = 0; t < 4; ++t) {
                const uint8_t raw = wp[s * 64 + r * 4 + t];
                const int v = SIGNED ? int(int8_t(raw)) : int(raw);
                I += v * int(xp[4 * s + t]);
              }
            I -= zz * X;
            float tt = ap[r] * float(I);
            if (HASC) tt = tt - cp[r] * float(X);
            ac[r] = ac[r] + d * tt;
          }
        }
      }
      store_lanes(p, acc, m0, mc, g);
    }
  }
}

// The weight stream ahead of sub-block j of group g (the groups lie one after another): the same
// block two groups ahead into L2, its scales one group ahead into L1. Against one group ahead
// into L1, whose fill buffers the stream kept full: one-token forward 11.9 -> 11.3 ms, 16-token
// 19.7 -> 19.0 ms (means of three interleaved runs, Sapphire Rapids, 2 threads).
inline __attribute__((always_inline)) void prefetch_ahead(const Args& p, int64_t g, int64_t j) {
  const char* nx = reinterpret_cast<const char*>(p.w + ((g + 2) * p.NB + j) * p.BB);
  for (int64_t s = 0; s < p.BB; s += 64) _mm_prefetch(nx + s, _MM_HINT_T1);
  const int64_t at = ((g + 1) * p.NB + j) * LANES;
  _mm_prefetch(p.ah ? reinterpret_cast<const char*>(p.ah + at) : reinterpret_cast<const char*>(p.a + at),
               _MM_HINT_T0);
}

// ---------------------------------------------------------------- AVX2 (maddubs; values <= 128)
// The 16 scales (and offsets) of (group, sub-block) `at`, lanes 0-7 and 8-15, float16 ones widened
template <bool HASC>
__attribute__((target("avx2,f16c"), always_inline)) inline void scales_avx2(const Args& p, int64_t at, __m256& al,
                                                                           __m256& ah, __m256& cl, __m256& ch) {
  if (p.ah) {
    const uint16_t* hp = p.ah + at * LANES;
    al = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)hp));
    ah = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(hp + 8)));
  } else {
    al = _mm256_loadu_ps(p.a + at * LANES);
    ah = _mm256_loadu_ps(p.a + at * LANES + 8);
  }
  cl = ch = _mm256_setzero_ps();
  if (HASC) {
    cl = _mm256_loadu_ps(p.c + at * LANES);
    ch = _mm256_loadu_ps(p.c + at * LANES + 8);
  }
}

// One row's sub-block sums (il, ih: lanes 0-7, 8-15) added into its 16 accumulators ac:
// ac + d * (a * (I - zero * X) - c * X), with the per-call terms of row and sub-block `at`
// (SUBZ: unsigned values, whose zero point comes off; signed ones are multiplied as they are)
template <bool HASC, bool SUBZ = true>
__attribute__((target("avx2"), always_inline)) inline void finish_avx2(const Args& p, int64_t at, __m256i il,
                                                                       __m256i ih, __m256 al, __m256 ah, __m256 cl,
                                                                       __m256 ch, float* ac) {
  if (SUBZ) {
    const __m256i zx = _mm256_set1_epi32(p.zx[at]);  // zero * X (0 without a zero point)
    il = _mm256_sub_epi32(il, zx);
    ih = _mm256_sub_epi32(ih, zx);
  }
  __m256 tl = _mm256_mul_ps(al, _mm256_cvtepi32_ps(il));
  __m256 th = _mm256_mul_ps(ah, _mm256_cvtepi32_ps(ih));
  if (HASC) {
    const __m256 xf = _mm256_set1_ps(p.xf[at]);
    tl = _mm256_sub_ps(tl, _mm256_mul_ps(cl, xf));
    th = _mm256_sub_ps(th, _mm256_mul_ps(ch, xf));
  }
  const __m256 d = _mm256_set1_ps(p.dj[at]);
  _mm256_store_ps(ac, _mm256_add_ps(_mm256_load_ps(ac), _mm256_mul_ps(d, tl)));
  _mm256_store_ps(ac + 8, _mm256_add_ps(_mm256_load_ps(ac + 8), _mm256_mul_ps(d, th)));
}

template <int G, bool SIGNED, bool HASC>
__attribute__((target("avx2,fma,f16c"))) void groups_avx2(const Args& p, int64_t g0, int64_t g1) {
  constexpr int S = G / 4;
  alignas(64) float acc[MCHUNK * LANES];
  const __m256i ones = _mm256_set1_epi16(1);
  // one or two rows stream the weights: a software prefetch two groups ahead (as the VNNI path
  // does) took the output layer from 18-20 to 25-26 GB/s on a 2-core AMD EPYC (Zen 3), about the
  // rate of a plain read; from 4 rows on it gained nothing there, and from 8 it cost
  const bool prefetch = p.M <= 2;
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t m0 = 0; m0 < p.M; m0 += MCHUNK) {
      const int64_t mc = std::min<int64_t>(MCHUNK, p.M - m0);
      std::fill(acc, acc + mc * LANES, 0.0f);
      for (int64_t j = 0; j < p.NB; ++j) {
        if (prefetch) prefetch_ahead(p, g, j);
        const uint8_t* wp = p.w + (g * p.NB + j) * p.BB;  // the byte layout (narrow values: groups_avx2_narrow)
        __m256i wl[S], wh[S];  // lanes 0-7, lanes 8-15 (absolute values when SIGNED)
        __m256i sl[S], sh[S];  // the signs, when SIGNED
        for (int s = 0; s < S; ++s) {
          wl[s] = _mm256_loadu_si256((const __m256i*)(wp + s * 64));
          wh[s] = _mm256_loadu_si256((const __m256i*)(wp + s * 64 + 32));
          if (SIGNED) {
            sl[s] = wl[s];
            sh[s] = wh[s];
            wl[s] = _mm256_sign_epi8(wl[s], wl[s]);
            wh[s] = _mm256_sign_epi8(wh[s], wh[s]);
          }
        }
        __m256 al, ah, cl, ch;
        scales_avx2<HASC>(p, g * p.NB + j, al, ah, cl, ch);
        for (int64_t m = 0; m < mc; ++m) {
          const int64_t row = m0 + m;
          const int8_t* xp = p.xq + row * p.K + j * G;
          __m256i il = _mm256_setzero_si256(), ih = _mm256_setzero_si256();
          for (int s = 0; s < S; ++s) {
            int32_t four;
            std::memcpy(&four, xp + 4 * s, 4);
            const __m256i xb = _mm256_set1_epi32(four);
            __m256i pl, ph;
            if (SIGNED) {
              pl = _mm256_maddubs_epi16(wl[s], _mm256_sign_epi8(xb, sl[s]));
              ph = _mm256_maddubs_epi16(wh[s], _mm256_sign_epi8(xb, sh[s]));
            } else {
              pl = _mm256_maddubs_epi16(wl[s], xb);
              ph = _mm256_maddubs_epi16(wh[s], xb);
            }
            il = _mm256_add_epi32(il, _mm256_madd_epi16(pl, ones));
            ih = _mm256_add_epi32(ih, _mm256_madd_epi16(ph, ones));
          }
          finish_avx2<HASC, !SIGNED>(p, row * p.NB + j, il, ih, al, ah, cl, ch, acc + m * LANES);
        }
      }
      store_lanes(p, acc, m0, mc, g);
    }
  }
}

// AVX2 for narrow values (4 or 5 bits: Q4_K, Q5_0), unpacked in registers rather than through
// `scratch`, with the maddubs pairs of several vectors summed as int16 before widening: a pair
// is at most 2 * 31 * 127 = 7874 (5 bits) or 2 * 15 * 127 = 3810 (4 bits), so 4 or 8 of them
// stay under 32767 and the integer sums are the same numbers (the float part is unchanged).
// One row builds each weight vector as it multiplies it; more rows build the sub-block once.
template <int BITS>
struct Avx2Narrow {
  static constexpr int SUM = BITS == 4 ? 8 : 4;  // int16 pairs summed before widening
};

// vector s (of S) of the sub-block at src, half q: the low or high nibbles of a stored vector,
// and the fifth bit from its 8 bytes (broadcast in `fifth`, for BITS == 5)
template <int S, int BITS>
__attribute__((target("avx2"), always_inline)) inline __m256i narrow_vec(const uint8_t* src, int s, int q,
                                                                         __m256i fifth) {
  const __m256i m4 = _mm256_set1_epi8(15);
  const int h = s < S / 2 ? s : s - S / 2;
  const __m256i v = _mm256_loadu_si256((const __m256i*)(src + h * 64 + q * 32));
  __m256i w = s < S / 2 ? _mm256_and_si256(v, m4) : _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
  if (BITS == 5) {
    // byte t of this half takes bit t % 8 of fifth-bit byte 4 q + t / 8
    const __m256i pick = q == 0 ? _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2,
                                                   2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3)
                                : _mm256_setr_epi8(4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6,
                                                   6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7);
    const __m256i bitm = _mm256_set1_epi64x(int64_t(0x8040201008040201ULL));
    __m256i b = _mm256_shuffle_epi8(fifth, pick);
    b = _mm256_cmpeq_epi8(_mm256_and_si256(b, bitm), bitm);
    w = _mm256_or_si256(w, _mm256_and_si256(b, _mm256_set1_epi8(16)));
  }
  return w;
}

template <int S, int BITS>
__attribute__((target("avx2"), always_inline)) inline __m256i fifth_bits(const uint8_t* src, int s) {
  if (BITS != 5) return _mm256_setzero_si256();
  int64_t eight;
  std::memcpy(&eight, src + S * 32 + s * 8, 8);
  return _mm256_set1_epi64x(eight);
}

// The integer sums of one row (xp) against a sub-block: vectors built here from src (FLY) or
// taken from wv, SUM maddubs pairs added as int16 before widening to int32.
template <int S, int BITS, int SUM, bool FLY>
__attribute__((target("avx2"), always_inline)) inline void narrow_row_sums(const uint8_t* src,
                                                                           const __m256i (*wv)[2],
                                                                           const int8_t* xp, __m256i& il,
                                                                           __m256i& ih) {
  const __m256i ones = _mm256_set1_epi16(1);
  il = _mm256_setzero_si256();
  ih = _mm256_setzero_si256();
  for (int s0 = 0; s0 < S; s0 += SUM) {
    __m256i sl = _mm256_setzero_si256(), sh = _mm256_setzero_si256();
    for (int s = s0; s < s0 + SUM; ++s) {
      int32_t four;
      std::memcpy(&four, xp + 4 * s, 4);
      const __m256i xb = _mm256_set1_epi32(four);
      __m256i w0, w1;
      if (FLY) {
        const __m256i fifth = fifth_bits<S, BITS>(src, s);
        w0 = narrow_vec<S, BITS>(src, s, 0, fifth);
        w1 = narrow_vec<S, BITS>(src, s, 1, fifth);
      } else {
        w0 = wv[s][0];
        w1 = wv[s][1];
      }
      sl = _mm256_add_epi16(sl, _mm256_maddubs_epi16(w0, xb));
      sh = _mm256_add_epi16(sh, _mm256_maddubs_epi16(w1, xb));
    }
    il = _mm256_add_epi32(il, _mm256_madd_epi16(sl, ones));
    ih = _mm256_add_epi32(ih, _mm256_madd_epi16(sh, ones));
  }
}

// Two rows (xa, xb) against a sub-block's weight vectors wv, as narrow_row_sums
template <int S, int SUM>
__attribute__((target("avx2"), always_inline)) inline void narrow_pair_sums(const __m256i (*wv)[2], const int8_t* xa,
                                                                            const int8_t* xb, __m256i& il0,
                                                                            __m256i& ih0, __m256i& il1,
                                                                            __m256i& ih1) {
  const __m256i ones = _mm256_set1_epi16(1);
  il0 = ih0 = il1 = ih1 = _mm256_setzero_si256();
  for (int s0 = 0; s0 < S; s0 += SUM) {
    __m256i sl0 = _mm256_setzero_si256(), sh0 = sl0, sl1 = sl0, sh1 = sl0;
    for (int s = s0; s < s0 + SUM; ++s) {
      int32_t fa, fb;
      std::memcpy(&fa, xa + 4 * s, 4);
      std::memcpy(&fb, xb + 4 * s, 4);
      const __m256i ba = _mm256_set1_epi32(fa), bb = _mm256_set1_epi32(fb);
      const __m256i w0 = wv[s][0], w1 = wv[s][1];
      sl0 = _mm256_add_epi16(sl0, _mm256_maddubs_epi16(w0, ba));
      sh0 = _mm256_add_epi16(sh0, _mm256_maddubs_epi16(w1, ba));
      sl1 = _mm256_add_epi16(sl1, _mm256_maddubs_epi16(w0, bb));
      sh1 = _mm256_add_epi16(sh1, _mm256_maddubs_epi16(w1, bb));
    }
    il0 = _mm256_add_epi32(il0, _mm256_madd_epi16(sl0, ones));
    ih0 = _mm256_add_epi32(ih0, _mm256_madd_epi16(sh0, ones));
    il1 = _mm256_add_epi32(il1, _mm256_madd_epi16(sl1, ones));
    ih1 = _mm256_add_epi32(ih1, _mm256_madd_epi16(sh1, ones));
  }
}

template <int G, int BITS, bool HASC>
__attribute__((target("avx2,fma,f16c"))) void groups_avx2_narrow(const Args& p, int64_t g0, int64_t g1) {
  constexpr int S = G / 4;
  constexpr int SUM = Avx2Narrow<BITS>::SUM < S ? Avx2Narrow<BITS>::SUM : S;
  alignas(64) float acc[MCHUNK * LANES];
  const bool prefetch = p.M <= 2;  // as in groups_avx2
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t m0 = 0; m0 < p.M; m0 += MCHUNK) {
      const int64_t mc = std::min<int64_t>(MCHUNK, p.M - m0);
      std::fill(acc, acc + mc * LANES, 0.0f);
      for (int64_t j = 0; j < p.NB; ++j) {
        if (prefetch) prefetch_ahead(p, g, j);
        const uint8_t* src = p.w + (g * p.NB + j) * p.BB;
        __m256 al, ah, cl, ch;
        scales_avx2<HASC>(p, g * p.NB + j, al, ah, cl, ch);
        __m256i wv[S][2];
        if (mc > 1)
          for (int s = 0; s < S; ++s) {
            const __m256i fifth = fifth_bits<S, BITS>(src, s);
            wv[s][0] = narrow_vec<S, BITS>(src, s, 0, fifth);
            wv[s][1] = narrow_vec<S, BITS>(src, s, 1, fifth);
          }
        int64_t m = 0;
        // two rows at a time share each weight vector's load
        for (; m + 1 < mc; m += 2) {
          const int64_t row = m0 + m;
          const int8_t* xp = p.xq + row * p.K + j * G;
          __m256i il0, ih0, il1, ih1;
          narrow_pair_sums<S, SUM>(wv, xp, xp + p.K, il0, ih0, il1, ih1);
          finish_avx2<HASC>(p, row * p.NB + j, il0, ih0, al, ah, cl, ch, acc + m * LANES);
          finish_avx2<HASC>(p, (row + 1) * p.NB + j, il1, ih1, al, ah, cl, ch, acc + (m + 1) * LANES);
        }
        for (; m < mc; ++m) {
          const int64_t row = m0 + m;
          const int8_t* xp = p.xq + row * p.K + j * G;
          __m256i il, ih;
          if (mc == 1)
            narrow_row_sums<S, BITS, SUM, true>(src, wv, xp, il, ih);
          else
            narrow_row_sums<S, BITS, SUM, false>(src, wv, xp, il, ih);
          finish_avx2<HASC>(p, row * p.NB + j, il, ih, al, ah, cl, ch, acc + m * LANES);
        }
      }
      store_lanes(p, acc, m0, mc, g);
    }
  }
}

// ---------------------------------------------------------------- AVX-512 VNNI
// The float part shared by the VNNI and AMX paths: one sub-block's integer sums of 16 outputs
// (row ``at`` of the per-call terms) added into ``acc``: acc + d * (a * I - c * X).
template <bool SUB_ZERO, bool HASC>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) inline __attribute__((always_inline)) __m512
finish16(const Args& p, int64_t at, __m512i is, __m512 av, __m512 cv, __m512 acc) {
  if (SUB_ZERO) is = _mm512_sub_epi32(is, _mm512_set1_epi32(p.zx[at]));
  __m512 t = _mm512_mul_ps(av, _mm512_cvtepi32_ps(is));
  if (HASC) t = _mm512_sub_ps(t, _mm512_mul_ps(cv, _mm512_set1_ps(p.xf[at])));
  return _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(p.dj[at]), t));
}

// the 16 scales of (group, sub-block) `at`, float16 ones widened (exactly)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) inline __attribute__((always_inline)) __m512
scales_v16(const Args& p, int64_t at) {
  if (p.ah) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p.ah + at * LANES)));
  return _mm512_loadu_ps(p.a + at * LANES);
}

// One sub-block's S vectors of 64 bytes in the byte layout, from the stored bytes at wp (narrow
// values unpacked in registers); signed bytes come flipped to unsigned (q + 128).
template <int G, bool SIGNED>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) inline __attribute__((always_inline)) void
vnni_block(const Args& p, const uint8_t* wp, __m512i* wv) {
  constexpr int S = G / 4;
  if (p.bits == 8) {
    const __m512i flip = _mm512_set1_epi8(char(0x80));
    for (int s = 0; s < S; ++s) {
      wv[s] = _mm512_loadu_si512((const void*)(wp + s * 64));
      if (SIGNED) wv[s] = _mm512_xor_si512(wv[s], flip);
    }
    return;
  }
  const __m512i m4 = _mm512_set1_epi8(15);
  for (int h = 0; h < S / 2; ++h) {
    const __m512i v = _mm512_loadu_si512((const void*)(wp + h * 64));
    wv[h] = _mm512_and_si512(v, m4);
    wv[h + S / 2] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
  }
  if (p.bits == 5) {
    const __m512i sixteen = _mm512_set1_epi8(16);
    for (int s = 0; s < S; ++s) {
      uint64_t bitsv;
      std::memcpy(&bitsv, wp + S * 32 + s * 8, 8);
      wv[s] = _mm512_mask_add_epi8(wv[s], __mmask64(bitsv), wv[s], sixteen);
    }
  }
}

// R rows of x against one group of 16 output rows, all sub-blocks: the accumulators stay in
// registers; the group's weights come from memory for the first rows and from cache after.
template <int G, bool SIGNED, bool HASC, int R, bool PREFETCH = false>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) inline void vnni_rows(
    const Args& p, int64_t g, int64_t m0) {
  constexpr int S = G / 4;
  const int zz = SIGNED ? 128 : p.zero;  // signed bytes run as unsigned (q + 128)
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < p.NB; ++j) {
    const uint8_t* wp = p.w + (g * p.NB + j) * p.BB;
    if (PREFETCH) prefetch_ahead(p, g, j);
    __m512i wv[S];
    vnni_block<G, SIGNED>(p, wp, wv);
    const __m512 av = scales_v16(p, g * p.NB + j);
    __m512 cv = _mm512_setzero_ps();
    if (HASC) cv = _mm512_loadu_ps(p.c + (g * p.NB + j) * LANES);
    // R == 1: two chains (integers: the split cannot change the sum); else one per row
    constexpr int C = R == 1 ? 2 : 1;
    __m512i isum[R * C];
    for (int r = 0; r < R * C; ++r) isum[r] = _mm512_setzero_si512();
    for (int s = 0; s < S; ++s)
      for (int r = 0; r < R; ++r) {
        int32_t four;
        std::memcpy(&four, p.xq + (m0 + r) * p.K + j * G + 4 * s, 4);
        __m512i& t = isum[r * C + (C == 2 ? (s & 1) : 0)];
        t = _mm512_dpbusd_epi32(t, wv[s], _mm512_set1_epi32(four));
      }
    for (int r = 0; r < R; ++r) {
      const int64_t at = (m0 + r) * p.NB + j;
      const __m512i is = C == 2 ? _mm512_add_epi32(isum[2 * r], isum[2 * r + 1]) : isum[r];
      acc[r] = zz ? finish16<true, HASC>(p, at, is, av, cv, acc[r])
                  : finish16<false, HASC>(p, at, is, av, cv, acc[r]);
    }
  }
  const int64_t n0 = g * LANES;
  const int64_t nv = std::min<int64_t>(LANES, p.N - n0);
  const __mmask16 keep = nv == LANES ? __mmask16(0xFFFF) : __mmask16((1u << nv) - 1);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(p.out + (m0 + r) * p.N + n0, keep, acc[r]);
}

// ---------------------------------------------------------------- AMX (Sapphire Rapids on)
// 16 rows of x against one group of 16 output rows: one tile multiply per sub-block gives all
// 256 integer dot products; the float part is the same as above, row by row.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

template <int G>
__attribute__((target("amx-tile,amx-int8"))) void amx_configure() {
  TileConfig cfg;
  cfg.colsb[0] = 64; cfg.rows[0] = 16;     // C: 16 x 16 int32
  cfg.colsb[1] = G;  cfg.rows[1] = 16;     // A: 16 rows of x, one sub-block of int8
  cfg.colsb[2] = 64; cfg.rows[2] = G / 4;  // B: the packed group, four bytes per output row
  cfg.colsb[3] = 64; cfg.rows[3] = 16;     // the same three again, for the next sub-block
  cfg.colsb[4] = G;  cfg.rows[4] = 16;
  cfg.colsb[5] = 64; cfg.rows[5] = G / 4;
  // gcc 12 at -O3 drops the stores above as dead (it does not see ldtilecfg read them)
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) inline void amx_release() { _tile_release(); }

// Narrow values of sub-block j of group g unpacked into the byte layout at `scratch` (S * 64
// bytes), one step before their tile load: a tile load does not take data from stores still in
// flight, so unpacking right before it stalled the tile unit.
template <int G>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) inline __attribute__((always_inline)) void amx_unpack(
    const Args& p, int64_t g, int64_t j, uint8_t* scratch) {
  constexpr int S = G / 4;
  __m512i wv[S];
  vnni_block<G, false>(p, p.w + (g * p.NB + j) * p.BB, wv);
  for (int s = 0; s < S; ++s) _mm512_store_si512((void*)(scratch + s * 64), wv[s]);
}

// One sub-block's tile multiply, on one of two tile sets (accumulator, x and weights: 0, 1, 2 or
// 3, 4, 5) that take turns, so that the AMX unit works while the vector units finish. The weights
// come from `b`: the stored bytes, or their unpacked copy.
template <int G, bool SIGNED>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8"))) inline __attribute__((always_inline)) void amx_issue(
    const Args& p, int64_t g, int64_t m0, int64_t j, bool second, const uint8_t* b) {
  prefetch_ahead(p, g, j);  // a tile load that misses stalls the tile multiply that needs it
  // two spelled-out branches: the tile intrinsics are macros that paste their tile number into
  // the assembly, so it cannot be a template parameter or a variable
  if (second) {
    _tile_zero(3);
    _tile_loadd(4, p.xq + m0 * p.K + j * G, p.K);
    _tile_loadd(5, b, 64);
    if (SIGNED)
      _tile_dpbssd(3, 4, 5);
    else
      _tile_dpbsud(3, 4, 5);
  } else {
    _tile_zero(0);
    _tile_loadd(1, p.xq + m0 * p.K + j * G, p.K);
    _tile_loadd(2, b, 64);
    if (SIGNED)
      _tile_dpbssd(0, 1, 2);
    else
      _tile_dpbsud(0, 1, 2);
  }
}

template <int G, bool SIGNED, bool HASC, bool NARROW, bool PARTIAL>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8"))) void amx_rows16(
    const Args& p, int64_t g, int64_t m0, int64_t mr) {
  const int64_t NB = p.NB;
  alignas(64) int32_t ints[2][16 * LANES];  // per tile set: its sub-block's integer sums
  alignas(64) uint8_t scratch[3][G * 16];   // narrow values: three sub-blocks, unpacked
  // Two sub-blocks in flight: sub-block j's sums are stored two tile multiplies after it was
  // issued, and read back (for its float part) one step after that, so neither the multiply's
  // latency nor the store's reaches the vector units. Narrow values: sub-block j is unpacked
  // into scratch[j % 3] one step before its tile load. The float parts run in order.
  constexpr bool narrow = NARROW;  // (a template parameter: the 8-bit loop has no unpacking's registers)
  auto weights = [&](int64_t j) -> const uint8_t* {
    return narrow ? scratch[j % 3] : p.w + (g * NB + j) * p.BB;
  };
  for (int64_t j = 0; narrow && j < std::min<int64_t>(3, NB); ++j) amx_unpack<G>(p, g, j, scratch[j]);
  amx_issue<G, SIGNED>(p, g, m0, 0, false, weights(0));
  if (NB > 1) amx_issue<G, SIGNED>(p, g, m0, 1, true, weights(1));
  const bool sub = !SIGNED && p.zero;
  // sixteen named accumulators (gcc leaves an array of them on the stack: a load and a store per
  // row and sub-block)
#define GR_ROWS16(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
#define GR_ACC(r) __m512 acc##r = _mm512_setzero_ps();
  GR_ROWS16(GR_ACC)
#undef GR_ACC
  for (int64_t j = 0; j <= NB; ++j) {
    if (j < NB) {
      if (j & 1)
        _tile_stored(3, ints[1], 64);
      else
        _tile_stored(0, ints[0], 64);
      if (j + 2 < NB) amx_issue<G, SIGNED>(p, g, m0, j + 2, j & 1, weights(j + 2));
      // scratch[j % 3] was read by the tile load of sub-block j, done before its sums were stored
      if (narrow && j + 3 < NB) amx_unpack<G>(p, g, j + 3, scratch[j % 3]);
    }
    if (j == 0) continue;
    const int64_t f = j - 1;  // the sub-block whose float part runs now
    const int32_t* __restrict in = ints[f & 1];
    const __m512 av = scales_v16(p, g * NB + f);
    __m512 cv = _mm512_setzero_ps();
    if (HASC) cv = _mm512_loadu_ps(p.c + (g * NB + f) * LANES);
#define GR_FINISH(r)                                                                         \
  if (!PARTIAL || r < mr) {                                                                  \
    const __m512i is = _mm512_load_si512((const void*)(in + r * LANES));                     \
    const int64_t at = (m0 + r) * NB + f;                                                    \
    acc##r = sub ? finish16<true, HASC>(p, at, is, av, cv, acc##r)                           \
                 : finish16<false, HASC>(p, at, is, av, cv, acc##r);                         \
  }
    GR_ROWS16(GR_FINISH)
#undef GR_FINISH
  }
  const int64_t n0 = g * LANES;
  const int64_t nv = std::min<int64_t>(LANES, p.N - n0);
  const __mmask16 keep = nv == LANES ? __mmask16(0xFFFF) : __mmask16((1u << nv) - 1);
#define GR_STORE(r) \
  if (!PARTIAL || r < mr) _mm512_mask_storeu_ps(p.out + (m0 + r) * p.N + n0, keep, acc##r);
  GR_ROWS16(GR_STORE)
#undef GR_STORE
#undef GR_ROWS16
}

// From this many rows on, the rows past the last multiple of 16 run as one tile multiply on rows
// padded to 16 (the float part and the stores only for the real rows) rather than the vector
// loop. Measured on a Sapphire Rapids Xeon, embedded model, one forward: 5 rows 17.6 -> 16.5 ms,
// 10 rows 24.3 -> 18.3, 13 rows 27.3 -> 20.1; 2 to 4 rows no difference.
constexpr int64_t AMX_PARTIAL_MIN = 5;

template <int G, bool SIGNED, bool HASC>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void groups_amx(
    const Args& p, int64_t g0, int64_t g1) {
  amx_configure<G>();
  for (int64_t g = g0; g < g1; ++g) {
    int64_t m = 0;
    for (; m + 16 <= p.M; m += 16)
      if (p.bits == 8)
        amx_rows16<G, SIGNED, HASC, false, false>(p, g, m, 16);
      else
        amx_rows16<G, SIGNED, HASC, true, false>(p, g, m, 16);
    if (p.M - m >= AMX_PARTIAL_MIN) {
      if (p.bits == 8)
        amx_rows16<G, SIGNED, HASC, false, true>(p, g, m, p.M - m);
      else
        amx_rows16<G, SIGNED, HASC, true, true>(p, g, m, p.M - m);
      m = p.M;
    }
    for (; m + 4 <= p.M; m += 4) vnni_rows<G, SIGNED, HASC, 4, true>(p, g, m);
    for (; m < p.M; ++m) vnni_rows<G, SIGNED, HASC, 1, true>(p, g, m);
  }
  amx_release();
}

template <int G, bool SIGNED, bool HASC>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void groups_vnni(
    const Args& p, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) {
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4) vnni_rows<G, SIGNED, HASC, 4, true>(p, g, m);
    for (; m < p.M; ++m) vnni_rows<G, SIGNED, HASC, 1, true>(p, g, m);
  }
}

using GroupFn = void (*)(const Args&, int64_t, int64_t);

template <int G, bool SIGNED, bool HASC>
GroupFn pick_isa(int isa) {
  if (isa == 3) return groups_amx<G, SIGNED, HASC>;
  if (isa == 2) return groups_vnni<G, SIGNED, HASC>;
  if (isa == 1) return groups_avx2<G, SIGNED, HASC>;
  return groups_generic<G, SIGNED, HASC>;
}

template <int G>
GroupFn pick_avx2_narrow(int bits, bool hasc) {
  if (bits == 4) return hasc ? groups_avx2_narrow<G, 4, true> : groups_avx2_narrow<G, 4, false>;
  return hasc ? groups_avx2_narrow<G, 5, true> : groups_avx2_narrow<G, 5, false>;
}

GroupFn pick(int isa, int G, bool is_signed, bool hasc, int bits) {
  if (isa == 1 && bits != 8) return G == 32 ? pick_avx2_narrow<32>(bits, hasc) : pick_avx2_narrow<16>(bits, hasc);
  if (G == 32) {
    if (is_signed) return hasc ? pick_isa<32, true, true>(isa) : pick_isa<32, true, false>(isa);
    return hasc ? pick_isa<32, false, true>(isa) : pick_isa<32, false, false>(isa);
  }
  if (is_signed) return hasc ? pick_isa<16, true, true>(isa) : pick_isa<16, true, false>(isa);
  return hasc ? pick_isa<16, false, true>(isa) : pick_isa<16, false, false>(isa);
}

// Linux hands out the AMX tile state only to processes that ask for it.
bool amx_permitted() {
  static const bool ok = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-int8") || !__builtin_cpu_supports("amx-tile")) return false;
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

// 3 AMX, 2 AVX-512 VNNI, 1 AVX2, 0 none; probed once (every matmul, attention and argmax asks)
int64_t best_isa() {
  static const int64_t isa = [] {
    __builtin_cpu_init();
    const bool vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    if (vnni) return amx_permitted() ? 3 : 2;
    return __builtin_cpu_supports("avx2") ? 1 : 0;
  }();
  return isa;
}

// One 32-wide block of x: its scale d = amax / 127 and xq = round_half_even(x * (1 / d)) clamped to
// +-127 (a NaN gives -127, as std::max/min order it), and the sums of xq per 16.
void quantize_block_generic(const float* xp, int8_t* qp, float* d_out, int32_t* xs) {
  float amax = 0.0f;
  for (int i = 0; i < XBLOCK; ++i) amax = std::max(amax, std::fabs(xp[i]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  *d_out = d;
  for (int i = 0; i < XBLOCK; ++i) {
    float v = std::nearbyint(xp[i] * id);
    v = std::min(127.0f, std::max(-127.0f, v));
    qp[i] = int8_t(v);
  }
  for (int h = 0; h < 2; ++h) {
    int32_t s = 0;
    for (int i = 0; i < 16; ++i) s += qp[h * 16 + i];
    xs[h] = s;
  }
}

// The same with AVX-512 (a libm call per value made the scalar loop ~40 us for 16 rows of 640):
// max and the clamp take their operands in the order that gives std::max/min's answer on NaN,
// the rounding is the default mode's (half to even), and the rest is exact.
__attribute__((target("avx512f,avx512bw"))) void quantize_block_avx512(const float* xp, int8_t* qp, float* d_out,
                                                                        int32_t* xs) {
  __m512 v[2];
  __m512 m = _mm512_setzero_ps();
  for (int h = 0; h < 2; ++h) {
    v[h] = _mm512_loadu_ps(xp + 16 * h);
    m = _mm512_max_ps(_mm512_abs_ps(v[h]), m);  // a NaN value keeps m
  }
  const float amax = _mm512_reduce_max_ps(m);
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  *d_out = d;
  for (int h = 0; h < 2; ++h) {
    __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v[h], _mm512_set1_ps(id)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_max_ps(r, _mm512_set1_ps(-127.0f));  // NaN -> -127
    r = _mm512_min_ps(r, _mm512_set1_ps(127.0f));
    const __m512i q = _mm512_cvtps_epi32(r);
    _mm_storeu_si128((__m128i*)(qp + 16 * h), _mm512_cvtepi32_epi8(q));
    xs[h] = _mm512_reduce_add_epi32(q);
  }
}

__attribute__((target("avx2"))) void quantize_block_avx2(const float* xp, int8_t* qp, float* d_out, int32_t* xs) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  __m256 m = _mm256_setzero_ps();
  for (int h = 0; h < 4; ++h) {
    v[h] = _mm256_loadu_ps(xp + 8 * h);
    m = _mm256_max_ps(_mm256_andnot_ps(sign, v[h]), m);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float amax = lanes[0];
  for (int i = 1; i < 8; ++i) amax = std::max(amax, lanes[i]);
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  *d_out = d;
  alignas(32) int32_t q[32];
  for (int h = 0; h < 4; ++h) {
    __m256 r = _mm256_round_ps(_mm256_mul_ps(v[h], _mm256_set1_ps(id)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_max_ps(r, _mm256_set1_ps(-127.0f));
    r = _mm256_min_ps(r, _mm256_set1_ps(127.0f));
    _mm256_store_si256((__m256i*)(q + 8 * h), _mm256_cvtps_epi32(r));
  }
  for (int h = 0; h < 2; ++h) {
    int32_t s = 0;
    for (int i = 0; i < 16; ++i) {
      qp[h * 16 + i] = int8_t(q[h * 16 + i]);
      s += q[h * 16 + i];
    }
    xs[h] = s;
  }
}

// x [M, K] float32 -> xq [M, K] int8, dx [M, K/32] float32, xs [M, K/16] int32
// (path: 0 plain C++, 1 AVX2, 2 AVX-512, -1 the best this CPU runs; all give the same bits)
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* dx, int32_t* xs, int path = -1) {
  static const int best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return 2;
    return __builtin_cpu_supports("avx2") ? 1 : 0;
  }();
  if (path < 0 || path > best) path = best;
  auto block = path == 2 ? quantize_block_avx512 : path == 1 ? quantize_block_avx2 : quantize_block_generic;
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t b = 0; b < K / XBLOCK; ++b)
        block(x + m * K + b * XBLOCK, xq + m * K + b * XBLOCK, dx + m * (K / XBLOCK) + b, xs + m * (K / 16) + b * 2);
  });
}

void check(bool ok, const char* msg) { TORCH_CHECK(ok, "genrefine qlinear: ", msg); }

// x [M, K] float32 contiguous -> (xq, dx, xs) as tensors (the `quantize` op, for tests and the
// PyTorch path); the matmuls quantize into per-thread scratch instead (prepare)
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& x, int64_t path = -1) {
  check(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be [M, K] float32 contiguous");
  const int64_t M = x.size(0), K = x.size(1);
  check(K % XBLOCK == 0, "K must be a multiple of 32");
  auto xq = at::empty({M, K}, x.options().dtype(at::kChar));
  auto dx = at::empty({M, K / XBLOCK}, x.options());
  auto xs = at::empty({M, K / 16}, x.options().dtype(at::kInt));
  quantize_rows(x.data_ptr<float>(), M, K, xq.data_ptr<int8_t>(), dx.data_ptr<float>(), xs.data_ptr<int32_t>(),
                int(path));
  return {xq, dx, xs};
}

// x quantized once (the int8 rows, their block scales and 16-wide sums): every weight that
// multiplies the same x can share it, with the same bits as quantizing it again. The arrays are
// the calling thread's scratch (see Scratch), valid until its next prepare.
struct XPrep {
  const int8_t* xq;
  const float* dx;
  const int32_t* xs;
  int64_t M, K;
};

// Per-thread arrays reused from call to call: a one-token layer step made ~7 tensors per matmul
// (the quantized x and the per-sub-block terms), about 5 us of its ~60 in allocation and setup.
struct Scratch {
  std::vector<int8_t> xq;
  std::vector<float> dx, xf, dj;
  std::vector<int32_t> xs, zx;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

XPrep prepare(const at::Tensor& x) {
  auto xc = x.to(at::kFloat).contiguous();
  check(xc.dim() == 2, "x must be [M, K]");
  const int64_t M = xc.size(0), K = xc.size(1);
  check(K % XBLOCK == 0, "K must be a multiple of 32");
  // where the AMX path may run a padded last tile (AMX_PARTIAL_MIN or more rows past a multiple
  // of 16), xq has rows up to the next multiple of 16: that tile load reads 16 rows and the rows
  // past M are discarded
  const int64_t padded = M % 16 >= AMX_PARTIAL_MIN ? (M + 15) / 16 * 16 : M;
  Scratch& sc = scratch();
  sc.xq.resize(size_t(std::max<int64_t>(padded * K, 1)));
  sc.dx.resize(size_t(std::max<int64_t>(M * (K / XBLOCK), 1)));
  sc.xs.resize(size_t(std::max<int64_t>(M * (K / 16), 1)));
  std::memset(sc.xq.data() + M * K, 0, size_t((padded - M) * K));
  quantize_rows(xc.data_ptr<float>(), M, K, sc.xq.data(), sc.dx.data(), sc.xs.data());
  return XPrep{sc.xq.data(), sc.dx.data(), sc.xs.data(), M, K};
}

int64_t block_bytes(int64_t group, int64_t bits) {
  const int64_t S = group / 4;
  return bits == 4 ? S * 32 : bits == 5 ? S * 40 : S * 64;
}

at::Tensor qlinear_prepared(const XPrep& xp, const at::Tensor& w, const at::Tensor& a, const at::Tensor& c,
                            int64_t group, int64_t zero, bool is_signed, int64_t n, int64_t bits, int64_t isa) {
  check(group == 16 || group == 32, "group must be 16 or 32");
  check(bits == 8 || bits == 4 || bits == 5, "bits must be 8, 4 or 5");
  check(bits == 8 || !is_signed, "narrow values must be unsigned");
  check(w.scalar_type() == at::kByte && w.is_contiguous(), "w must be contiguous uint8");
  if (bits == 8)
    check(w.dim() == 5 && w.size(2) == group / 4 && w.size(3) == LANES && w.size(4) == 4,
          "w must be [NG, NB, G/4, 16, 4] for 8-bit values");
  else
    check(w.dim() == 3 && w.size(2) == block_bytes(group, bits), "w must be [NG, NB, block bytes] for narrow values");
  const int64_t NG = w.size(0), NB = w.size(1), K = NB * group;
  check(xp.K == K, "x must be [M, K] with K = blocks * group");
  check(n > (NG - 1) * LANES && n <= NG * LANES, "n does not match the groups");
  const bool half = a.scalar_type() == at::kHalf;
  check((half || a.scalar_type() == at::kFloat) && a.is_contiguous() && a.numel() == NG * NB * LANES,
        "a must be float32 or float16 [NG, NB, 16]");
  const bool hasc = c.numel() != 0;
  if (hasc) check(c.scalar_type() == at::kFloat && c.is_contiguous() && c.numel() == NG * NB * LANES, "c must be float32 [NG, NB, 16] or empty");
  const int64_t M = xp.M;
  auto out = at::empty({M, n}, at::TensorOptions().dtype(at::kFloat));
  if (M == 0) return out;
  if (isa < 0) isa = best_isa();
  if (isa == 3 && !amx_permitted()) isa = 2;
  Args p{xp.xq, xp.dx, xp.xs, w.data_ptr<uint8_t>(),
         half ? nullptr : a.data_ptr<float>(), hasc ? c.data_ptr<float>() : nullptr, out.data_ptr<float>(), M, K,
         n, NB, int(zero)};
  if (half) p.ah = reinterpret_cast<const uint16_t*>(a.data_ptr<at::Half>());
  p.bits = int(bits);
  p.BB = block_bytes(group, bits);
  // the per-row, per-sub-block terms every path needs
  Scratch& sc = scratch();
  sc.zx.resize(size_t(M * NB));
  sc.xf.resize(size_t(M * NB));
  sc.dj.resize(size_t(M * NB));
  {
    const int32_t* xs = xp.xs;
    const float* dxp = xp.dx;
    int32_t* zxp = sc.zx.data();
    float* xfp = sc.xf.data();
    float* djp = sc.dj.data();
    const int zzv = is_signed ? 128 : int(zero);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < NB; ++j) {
        const int32_t* r = xs + m * (K / 16);
        const int X = group == 32 ? r[2 * j] + r[2 * j + 1] : r[j];
        zxp[m * NB + j] = zzv * X;
        xfp[m * NB + j] = float(X);
        djp[m * NB + j] = dxp[m * (K / XBLOCK) + (j * group) / XBLOCK];
      }
    p.zx = zxp;
    p.xf = xfp;
    p.dj = djp;
  }
  GroupFn fn = pick(int(isa), int(group), is_signed, hasc, int(bits));
  // about 64K multiply-adds per task: small weights stay on one thread
  const int64_t grain = std::max<int64_t>(1, 65536 / (LANES * K * std::min<int64_t>(M, MCHUNK)));
  at::parallel_for(0, NG, grain, [&](int64_t g0, int64_t g1) { fn(p, g0, g1); });
  return out;
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& a, const at::Tensor& c,
                   int64_t group, int64_t zero, bool is_signed, int64_t n, int64_t bits, int64_t isa) {
  check(x.dim() == 2, "x must be [M, K]");
  check(w.dim() >= 3 && x.size(1) == w.size(1) * group, "x must be [M, K] with K = blocks * group");
  return qlinear_prepared(prepare(x), w, a, c, group, zero, is_signed, n, bits, isa);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_op(const at::Tensor& x, int64_t path) {
  return quantize(x.to(at::kFloat).contiguous(), path);
}

int64_t isa_op() { return best_isa(); }

// RMSNorm of float32 rows in one call (the runtime's six norms per layer were ~8 small ops each):
// y = (x * r) * w with r = 1 / sqrt(mean(x^2) + eps); the sum of squares runs over 16 lanes in
// order, then the lanes pairwise: a fixed order for every row, however many rows there are.
at::Tensor rmsnorm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "rmsnorm wants float32");
  const int64_t d = x.size(-1);
  check(w.numel() == d && d % 16 == 0, "rmsnorm: weight size must equal the last dim (a multiple of 16)");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto y = at::empty_like(xc);
  const int64_t rows = xc.numel() / d;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = float(eps);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * d;
    float lanes[16] = {};
    for (int64_t i = 0; i < d; i += 16)
      for (int l = 0; l < 16; ++l) lanes[l] = lanes[l] + xr[i + l] * xr[i + l];
    for (int width = 8; width >= 1; width /= 2)
      for (int l = 0; l < width; ++l) lanes[l] = lanes[l] + lanes[l + width];
    const float inv = 1.0f / std::sqrt(lanes[0] / float(d) + e);
    float* yr = yp + r * d;
    for (int64_t i = 0; i < d; ++i) yr[i] = (xr[i] * inv) * wp[i];
  }
  return y;
}

// Rotary embedding x * cos + rotate_half(x) * sin for float32 x [..., n, D] and cos/sin [n, D]:
// the same three roundings per element as the PyTorch expression (no fused multiply-add), in
// one call instead of seven.
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check(x.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
        "rope wants float32");
  const int64_t D = x.size(-1), n = x.size(-2);
  check(D % 2 == 0 && cos.numel() == n * D && sin.numel() == n * D, "rope: cos/sin must be [n, D]");
  auto xc = x.contiguous();
  auto cc = cos.contiguous();
  auto sc = sin.contiguous();
  auto y = at::empty_like(xc);
  const int64_t heads = xc.numel() / (n * D), h = D / 2;
  const float* xp = xc.data_ptr<float>();
  const float* cp = cc.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t b = 0; b < heads; ++b)
    for (int64_t t = 0; t < n; ++t) {
      const float* xr = xp + (b * n + t) * D;
      const float* cr = cp + t * D;
      const float* sr = sp + t * D;
      float* yr = yp + (b * n + t) * D;
      for (int64_t i = 0; i < h; ++i) yr[i] = xr[i] * cr[i] + (-xr[i + h]) * sr[i];
      for (int64_t i = h; i < D; ++i) yr[i] = xr[i] * cr[i] + xr[i - h] * sr[i];
    }
  return y;
}

// ---------------------------------------------------------------- exact attention
// Each row's attention is a function of its query and of the keys and values it sees, in
// position order, and of nothing else: the arithmetic below runs the same way for a row decoded
// alone and for the same row among 63 others, in a chain or in a tree (a tree node sees the
// committed prefix, then its ancestors, whose keys and values equal those sequential decoding
// would have put in the following slots). float32 throughout, no fused multiply-adds:
//   s_k = dot(q, k_k) * scale (16 lanes in order, then pairwise), soft-capped if asked;
//   e_k = exp(s_k - max s), 0 where that is subnormal (under FLT_MIN);
//   out = (sum_k e_k v_k, in order) / (sum_k e_k, in order).
typedef float v16 __attribute__((vector_size(64)));

typedef int32_t vi16 __attribute__((vector_size(64)));

// the lanes of v added 8 + 8, 4 + 4, 2 + 2, 1 + 1: lane l of each step is lanes[l] + lanes[l + w]
// (in registers: each step adds v to itself shifted down by w lanes; lanes >= w are not used)
inline __attribute__((always_inline)) float hsum16(v16 v) {
  v = v + __builtin_shuffle(v, vi16{8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15});
  v = v + __builtin_shuffle(v, vi16{4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7});
  v = v + __builtin_shuffle(v, vi16{2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3});
  v = v + __builtin_shuffle(v, vi16{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1});
  return v[0];
}

inline __attribute__((always_inline)) v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// One row of one key/value head against its visible slots, for the `group` query heads that
// share that key/value head, in three steps: the scores (each key is loaded once for all heads),
// the maximum, exponentials and denominator (attend_softmax), and the weighted sum of the values
// over the keys in order (acc: group * D floats of scratch). G: the group size where it is known at compile time, else 0 and `group` at
// run time. D % 16 == 0.
template <int G>
inline __attribute__((always_inline)) void attend_scores_body(
    const float* const* qs, int group, const float* kb, const int64_t* slots, int64_t L, int64_t D,
    float sc, float cap, float* e) {
  const int gs = G > 0 ? G : group;
  const int64_t C = D / 16;
  for (int64_t k = 0; k < L; ++k) {
    const float* kr = kb + slots[k] * D;
    v16 a[8];
    for (int h = 0; h < gs; ++h) a[h] = v16{};
    for (int64_t c = 0; c < C; ++c) {
      const v16 kv = load16(kr + 16 * c);
      for (int h = 0; h < gs; ++h) a[h] = a[h] + load16(qs[h] + 16 * c) * kv;
    }
    for (int h = 0; h < gs; ++h) {
      float sk = hsum16(a[h]) * sc;
      if (cap > 0.0f) sk = std::tanh(sk / cap) * cap;
      e[h * L + k] = sk;
    }
  }
}

// The keys in chunks of KEY_CHUNK: a chunk's values stay in L1 while every 16-wide block of the
// accumulators goes through it in registers (with the keys outermost, each key's products were
// added to accumulators loaded from and stored back to memory: the stores bounded the loop).
// Each output lane still sums over the keys in order. acc: group * D floats of scratch.
constexpr int64_t KEY_CHUNK = 16;

template <int G>
inline __attribute__((always_inline)) void attend_values_body(
    int group, const float* vb, const int64_t* slots, int64_t L, int64_t D, int64_t ld, const float* e,
    const float* denom, float* acc, float* const* outs) {
  const int gs = G > 0 ? G : group;
  for (int64_t k0 = 0; k0 < std::max<int64_t>(L, 1); k0 += KEY_CHUNK) {
    const int64_t k1 = std::min(L, k0 + KEY_CHUNK);
    for (int64_t c = 0; c < D; c += 16) {
      v16 a[8];
      for (int h = 0; h < gs; ++h) a[h] = k0 == 0 ? v16{} : load16(acc + h * D + c);
      for (int64_t k = k0; k < k1; ++k) {
        const v16 vv = load16(vb + slots[k] * ld + c);
        for (int h = 0; h < gs; ++h) a[h] = a[h] + vv * e[h * L + k];
      }
      for (int h = 0; h < gs; ++h) {
        const v16 o = k1 < L ? a[h] : a[h] / denom[h];
        std::memcpy((k1 < L ? acc + h * D : outs[h]) + c, &o, sizeof(o));
      }
    }
  }
}

// e: the scores of each head (rows of L) -> their exponentials; denom: their sums, in order.
// An exponential under the smallest normal float is 0: a subnormal one weighs nothing next to
// the largest (1), but every multiply that meets a subnormal takes a slow microcode path on x86
// (peaked attention of a real model ran 1.5x slower). exp(x) < FLT_MIN for every x < -88, so
// those are not computed.
inline float softmax_weight(float score, float mx) {
  const float x = score - mx;
  const float ex = x < -88.0f ? 0.0f : std::exp(x);
  return ex < FLT_MIN ? 0.0f : ex;
}

inline float row_max(const float* e, int64_t L) {
  float mx = -INFINITY;
  for (int64_t k = 0; k < L; ++k) mx = std::max(mx, e[k]);
  return mx;
}

// the weights' sum in key order (the denominator)
inline float row_sum(const float* e, int64_t L) {
  float sum = 0.0f;
  for (int64_t k = 0; k < L; ++k) sum = sum + e[k];
  return sum;
}

void attend_softmax(int group, int64_t L, float* e, float* denom) {
  for (int h = 0; h < group; ++h) {
    float* eh = e + h * L;
    const float mx = row_max(eh, L);
    for (int64_t k = 0; k < L; ++k) eh[k] = softmax_weight(eh[k], mx);
    denom[h] = row_sum(eh, L);
  }
}

using ScoresFn = void (*)(const float* const*, int, const float*, const int64_t*, int64_t, int64_t, float, float,
                          float*);
using ValuesFn = void (*)(int, const float*, const int64_t*, int64_t, int64_t, int64_t, const float*, const float*,
                          float*, float* const*);

#define GENREFINE_ATTEND(SUFFIX, TARGET)                                                                       \
  template <int G>                                                                                             \
  TARGET void attend_scores_##SUFFIX(const float* const* qs, int group, const float* kb, const int64_t* slots, \
                                     int64_t L, int64_t D, float sc, float cap, float* e) {                  \
    attend_scores_body<G>(qs, group, kb, slots, L, D, sc, cap, e);                                           \
  }                                                                                                          \
  template <int G>                                                                                             \
  TARGET void attend_values_##SUFFIX(int group, const float* vb, const int64_t* slots, int64_t L, int64_t D, \
                                     int64_t ld, const float* e, const float* denom, float* acc,             \
                                     float* const* outs) {                                                   \
    attend_values_body<G>(group, vb, slots, L, D, ld, e, denom, acc, outs);                                  \
  }                                                                                                          \
  std::pair<ScoresFn, ValuesFn> attend_fns_##SUFFIX(int group) {                                               \
    switch (group) {                                                                                           \
      case 1: return {attend_scores_##SUFFIX<1>, attend_values_##SUFFIX<1>};                                   \
      case 2: return {attend_scores_##SUFFIX<2>, attend_values_##SUFFIX<2>};                                   \
      case 4: return {attend_scores_##SUFFIX<4>, attend_values_##SUFFIX<4>};                                   \
      default: return {attend_scores_##SUFFIX<0>, attend_values_##SUFFIX<0>};                                  \
    }                                                                                                          \
  }
GENREFINE_ATTEND(avx512, __attribute__((target("avx512f"))))
GENREFINE_ATTEND(generic, )
#undef GENREFINE_ATTEND

// AVX2: the same sums in two 8-lane halves (lanes 0-7 and 8-15 of the 16-lane vectors above),
// written out because GCC spills arrays of 64-byte vectors to the stack on AVX2 (3x slower).
// hsum16's steps: lanes l + l+8 (the halves added), then 4, 2 and 1 apart.
__attribute__((target("avx2"))) inline float hsum16_avx2(__m256 lo, __m256 hi) {
  const __m256 s8 = _mm256_add_ps(lo, hi);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

template <int G>
__attribute__((target("avx2"))) void attend_scores_avx2(const float* const* qs, int group, const float* kb,
                                                        const int64_t* slots, int64_t L, int64_t D, float sc,
                                                        float cap, float* e) {
  const int gs = G > 0 ? G : group;
  for (int64_t k = 0; k < L; ++k) {
    const float* kr = kb + slots[k] * D;
    __m256 lo[8], hi[8];
    for (int h = 0; h < gs; ++h) lo[h] = hi[h] = _mm256_setzero_ps();
    for (int64_t c = 0; c < D; c += 16) {
      const __m256 kl = _mm256_loadu_ps(kr + c), kh = _mm256_loadu_ps(kr + c + 8);
      for (int h = 0; h < gs; ++h) {
        lo[h] = _mm256_add_ps(lo[h], _mm256_mul_ps(_mm256_loadu_ps(qs[h] + c), kl));
        hi[h] = _mm256_add_ps(hi[h], _mm256_mul_ps(_mm256_loadu_ps(qs[h] + c + 8), kh));
      }
    }
    for (int h = 0; h < gs; ++h) {
      float sk = hsum16_avx2(lo[h], hi[h]) * sc;
      if (cap > 0.0f) sk = std::tanh(sk / cap) * cap;
      e[h * L + k] = sk;
    }
  }
}

// Four heads (h0 on; past the last head, the last one again, its output written twice with the
// same numbers) as attend_values_body, each 16-lane block in two halves: written out, since GCC
// stored the arrays of accumulators back to the stack on every key.
__attribute__((target("avx2"))) void attend_values4_avx2(int gs, int h0, const float* vb, const int64_t* slots,
                                                        int64_t L, int64_t D, int64_t ld, const float* e, const float* denom,
                                                        float* acc, float* const* outs) {
  const int h1 = std::min(h0 + 1, gs - 1), h2 = std::min(h0 + 2, gs - 1), h3 = std::min(h0 + 3, gs - 1);
  const float *e0 = e + h0 * L, *e1 = e + h1 * L, *e2 = e + h2 * L, *e3 = e + h3 * L;
  float *a0 = acc, *a1 = acc + D, *a2 = acc + 2 * D, *a3 = acc + 3 * D;
  for (int64_t k0 = 0; k0 < std::max<int64_t>(L, 1); k0 += KEY_CHUNK) {
    const int64_t k1 = std::min(L, k0 + KEY_CHUNK);
    for (int64_t c = 0; c < D; c += 16) {
      __m256 l0, g0, l1, g1, l2, g2, l3, g3;
      if (k0 == 0) {
        l0 = g0 = l1 = g1 = l2 = g2 = l3 = g3 = _mm256_setzero_ps();
      } else {
        l0 = _mm256_loadu_ps(a0 + c), g0 = _mm256_loadu_ps(a0 + c + 8);
        l1 = _mm256_loadu_ps(a1 + c), g1 = _mm256_loadu_ps(a1 + c + 8);
        l2 = _mm256_loadu_ps(a2 + c), g2 = _mm256_loadu_ps(a2 + c + 8);
        l3 = _mm256_loadu_ps(a3 + c), g3 = _mm256_loadu_ps(a3 + c + 8);
      }
      for (int64_t k = k0; k < k1; ++k) {
        const float* vr = vb + slots[k] * ld + c;
        const __m256 vl = _mm256_loadu_ps(vr), vh = _mm256_loadu_ps(vr + 8);
        __m256 w = _mm256_broadcast_ss(e0 + k);
        l0 = _mm256_add_ps(l0, _mm256_mul_ps(vl, w)), g0 = _mm256_add_ps(g0, _mm256_mul_ps(vh, w));
        w = _mm256_broadcast_ss(e1 + k);
        l1 = _mm256_add_ps(l1, _mm256_mul_ps(vl, w)), g1 = _mm256_add_ps(g1, _mm256_mul_ps(vh, w));
        w = _mm256_broadcast_ss(e2 + k);
        l2 = _mm256_add_ps(l2, _mm256_mul_ps(vl, w)), g2 = _mm256_add_ps(g2, _mm256_mul_ps(vh, w));
        w = _mm256_broadcast_ss(e3 + k);
        l3 = _mm256_add_ps(l3, _mm256_mul_ps(vl, w)), g3 = _mm256_add_ps(g3, _mm256_mul_ps(vh, w));
      }
      if (k1 < L) {
        _mm256_storeu_ps(a0 + c, l0), _mm256_storeu_ps(a0 + c + 8, g0);
        _mm256_storeu_ps(a1 + c, l1), _mm256_storeu_ps(a1 + c + 8, g1);
        _mm256_storeu_ps(a2 + c, l2), _mm256_storeu_ps(a2 + c + 8, g2);
        _mm256_storeu_ps(a3 + c, l3), _mm256_storeu_ps(a3 + c + 8, g3);
      } else {
        __m256 dn = _mm256_set1_ps(denom[h0]);
        _mm256_storeu_ps(outs[h0] + c, _mm256_div_ps(l0, dn)), _mm256_storeu_ps(outs[h0] + c + 8, _mm256_div_ps(g0, dn));
        dn = _mm256_set1_ps(denom[h1]);
        _mm256_storeu_ps(outs[h1] + c, _mm256_div_ps(l1, dn)), _mm256_storeu_ps(outs[h1] + c + 8, _mm256_div_ps(g1, dn));
        dn = _mm256_set1_ps(denom[h2]);
        _mm256_storeu_ps(outs[h2] + c, _mm256_div_ps(l2, dn)), _mm256_storeu_ps(outs[h2] + c + 8, _mm256_div_ps(g2, dn));
        dn = _mm256_set1_ps(denom[h3]);
        _mm256_storeu_ps(outs[h3] + c, _mm256_div_ps(l3, dn)), _mm256_storeu_ps(outs[h3] + c + 8, _mm256_div_ps(g3, dn));
      }
    }
  }
}

template <int G>
__attribute__((target("avx2"))) void attend_values_avx2(int group, const float* vb, const int64_t* slots, int64_t L,
                                                        int64_t D, int64_t ld, const float* e, const float* denom,
                                                        float* acc, float* const* outs) {
  const int gs = G > 0 ? G : group;
  for (int h0 = 0; h0 < gs; h0 += 4) attend_values4_avx2(gs, h0, vb, slots, L, D, ld, e, denom, acc, outs);
}

std::pair<ScoresFn, ValuesFn> attend_fns_avx2(int group) {
  switch (group) {
    case 1: return {attend_scores_avx2<1>, attend_values_avx2<1>};
    case 2: return {attend_scores_avx2<2>, attend_values_avx2<2>};
    case 4: return {attend_scores_avx2<4>, attend_values_avx2<4>};
    default: return {attend_scores_avx2<0>, attend_values_avx2<0>};
  }
}

// One sequence's rows in an attention call: rows r0 .. r0 + n - 1 of the call's queries and
// outputs ([H, rows, D]) against its own cache (k / v: [KV, S, D]), its new tokens at slots
// start .. with positions pos and tree mask tree ([n, n]; nullptr: a chain).
struct AttnSeq {
  const float* k;
  const float* v;
  int64_t S, start;
  const int64_t* pos;
  const bool* tree;
  int64_t r0, n;
};

// The checks of one sequence's attention arguments; pos_out / tree_out keep the converted
// tensors alive while the AttnSeq points into them.
AttnSeq attn_seq(const at::Tensor& keys, const at::Tensor& values, int64_t start, const at::Tensor& positions,
                 const at::Tensor& tree, int64_t r0, int64_t n, int64_t KV, int64_t D, at::Tensor& pos_out,
                 at::Tensor& tree_out) {
  check(keys.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat, "attend wants float32 keys and values");
  check(keys.dim() == 3 && values.dim() == 3 && keys.sizes() == values.sizes(), "attend: keys/values [KV, S, D]");
  check(keys.size(0) == KV && keys.size(2) == D, "attend: keys/values must have the queries' key/value heads and head size");
  check(keys.is_contiguous() && values.is_contiguous(), "attend: keys and values must be contiguous");
  const int64_t S = keys.size(1);
  check(positions.numel() == n && start >= 0 && start + n <= S, "attend: positions / slots");
  const bool is_tree = tree.numel() != 0;
  if (is_tree) check(tree.scalar_type() == at::kBool && tree.numel() == n * n, "attend: tree mask [n, n] bool");
  pos_out = positions.to(at::kLong).contiguous();
  tree_out = is_tree ? tree.contiguous() : tree;
  return AttnSeq{keys.data_ptr<float>(), values.data_ptr<float>(), S, start, pos_out.data_ptr<int64_t>(),
                 is_tree ? tree_out.data_ptr<bool>() : nullptr, r0, n};
}

// One row of one key/value head (its `group` query heads qs, outputs outs) against the visible
// slots of kb / vb, on all threads: their keys split for the scores and exponentials, the value
// columns for the sums; the maximum and the denominators (key order) on this thread. The same
// calls as a task of attend_rows's loop makes for the whole row, so the same bits. e: scratch.
void attend_split(ScoresFn scores_fn, ValuesFn values_fn, int group, const float* const* qs, float* const* outs,
                  const float* kb, const float* vb, const std::vector<int64_t>& slots, int64_t D, float sc,
                  float cap, std::vector<float>& e) {
  const int64_t L = int64_t(slots.size());
  e.resize(size_t(group) * std::max<int64_t>(L, 1));
  at::parallel_for(0, L, 16, [&](int64_t k0, int64_t k1) {
    std::vector<float> part(size_t(group) * (k1 - k0));
    scores_fn(qs, group, kb, slots.data() + k0, k1 - k0, D, sc, cap, part.data());
    for (int h = 0; h < group; ++h)
      std::memcpy(e.data() + h * L + k0, part.data() + h * (k1 - k0), size_t(k1 - k0) * sizeof(float));
  });
  float mx[8], denom[8];
  for (int h = 0; h < group; ++h) mx[h] = row_max(e.data() + h * L, L);
  at::parallel_for(0, L, 64, [&](int64_t k0, int64_t k1) {
    for (int h = 0; h < group; ++h)
      for (int64_t k = k0; k < k1; ++k) e[h * L + k] = softmax_weight(e[h * L + k], mx[h]);
  });
  for (int h = 0; h < group; ++h) denom[h] = row_sum(e.data() + h * L, L);
  at::parallel_for(0, D / 16, 1, [&](int64_t c0, int64_t c1) {
    const int64_t width = (c1 - c0) * 16;
    std::vector<float> acc(size_t(std::max(group, 4)) * width);
    float* part_outs[8];
    for (int h = 0; h < group; ++h) part_outs[h] = outs[h] + 16 * c0;
    values_fn(group, vb + 16 * c0, slots.data(), L, width, D, e.data(), denom, acc.data(), part_outs);
  });
}

// Attention of the query rows qp ([H, rows, D], contiguous) into op (the same shape): each
// sequence's rows against its own cache, all in one parallel loop.
// split: -1 as it pays (below), 0 never split a row's keys, 1 whenever it can (tests and benchmarks)
void attend_rows(const float* qp, float* op, int64_t rows, int64_t H, int64_t KV, int64_t D,
                 const std::vector<AttnSeq>& seqs, int64_t window, float sc, float cap, int64_t split = -1) {
  const int group = int(H / KV);
  int64_t work = 0;
  for (const AttnSeq& sq : seqs) {
    int64_t most = 0;
    for (int64_t r = 0; r < sq.n; ++r) most = std::max(most, sq.pos[r] + 1);
    work += H * sq.n * std::max<int64_t>(most, 1) * D;
  }
  const int64_t isa = best_isa();
  // the slots row r of sq sees, in position order: the prefix within the window, then the new
  // tokens it sees (a chain: j <= r; a tree: its ancestors)
  auto visible = [&](const AttnSeq& sq, int64_t r, std::vector<int64_t>& slots) {
    const int64_t* pos = sq.pos;
    const int64_t p = pos[r], start = sq.start;
    const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
    slots.clear();
    for (int64_t sl = lo; sl < std::min(start, p + 1); ++sl) slots.push_back(sl);
    const size_t first_new = slots.size();
    for (int64_t j = 0; j < sq.n; ++j) {
      const bool sees = sq.tree ? sq.tree[r * sq.n + j] : j <= r;
      if (sees && pos[j] >= lo) slots.push_back(start + j);
    }
    auto earlier = [&](int64_t a, int64_t b) { return pos[a - start] < pos[b - start]; };
    if (!std::is_sorted(slots.begin() + first_new, slots.end(), earlier))  // a chain is in order
      std::sort(slots.begin() + first_new, slots.end(), earlier);
  };
  const int64_t threads = at::get_num_threads();
  int64_t pairs = 0;  // (row, key/value head) pairs
  for (const AttnSeq& sq : seqs) pairs += KV * sq.n;
  // Fewer pairs than threads with much to do (one-token decoding, one key/value head): each pair
  // on all threads in turn, the threads splitting its keys for the scores and exponentials and
  // the value columns for the sums. Each thread then reads a share of the keys and values
  // instead of all of them (they come from the L3 cache or memory: the split over query heads
  // below read every key and value once per thread). The same arithmetic per key and per
  // output lane, in the same order (denominators summed in key order), so the same bits.
  if (split != 0 && (split > 0 || (threads > 1 && pairs < threads && work > (1 << 16)))) {
    const auto [scores_fn, values_fn] =
        isa >= 2 ? attend_fns_avx512(group) : isa == 1 ? attend_fns_avx2(group) : attend_fns_generic(group);
    std::vector<int64_t> slots;
    std::vector<float> e;
    for (const AttnSeq& sq : seqs)
      for (int64_t r = 0; r < sq.n; ++r)
        for (int64_t kv = 0; kv < KV; ++kv) {
          visible(sq, r, slots);
          const float* qs[8];
          float* outs[8];
          for (int h = 0; h < group; ++h) {
            qs[h] = qp + ((kv * group + h) * rows + sq.r0 + r) * D;
            outs[h] = op + ((kv * group + h) * rows + sq.r0 + r) * D;
          }
          attend_split(scores_fn, values_fn, group, qs, outs, sq.k + kv * sq.S * D, sq.v + kv * sq.S * D, slots,
                       D, sc, cap, e);
        }
    return;
  }
  // Otherwise (split 0), with fewer pairs than threads, the query heads that share a key/value
  // head split into `parts`, one task each. Every head's sums are its own and run in the same
  // order however the heads are grouped, so the bits stay.
  int parts = 1;
  if (work > (1 << 16))
    while (KV * rows * parts < threads && group % (parts * 2) == 0) parts *= 2;
  const int gp = group / parts;  // query heads per task
  const auto [scores_part, values_part] =
      isa >= 2 ? attend_fns_avx512(gp) : isa == 1 ? attend_fns_avx2(gp) : attend_fns_generic(gp);
  // the tasks of sequence b: first[b] .. first[b + 1] - 1, KV * n * parts of them
  std::vector<int64_t> first(seqs.size() + 1, 0);
  for (size_t b = 0; b < seqs.size(); ++b) first[b + 1] = first[b] + KV * seqs[b].n * parts;
  // rows on all threads from about 64K multiply-adds on (a few microseconds of one core); at 1M
  // (before) a 13-row verification over 80 keys ran on one core: 2.0 -> 1.2 ms per forward of
  // the embedded model, 2 threads
  const int64_t tasks = first.back();
  at::parallel_for(0, tasks, work > (1 << 16) ? 1 : tasks, [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> slots;
    std::vector<float> e, acc(size_t(std::max(gp, 4)) * D);
    size_t b = 0;
    for (int64_t t = t0; t < t1; ++t) {
      while (first[b + 1] <= t) ++b;
      const AttnSeq& sq = seqs[b];
      const int64_t u = t - first[b], n = sq.n;
      // the row: rows taken from both ends in turn (0, n-1, 1, n-2, ...), so that the threads'
      // contiguous shares of tasks hold as many keys each (in a chain, row r sees r + 1 of them:
      // in order, the last thread got most of the work and the first waited)
      const int64_t i = (u / parts) % n;
      const int64_t r = i % 2 == 0 ? i / 2 : n - 1 - i / 2;
      const int64_t kv = u / (n * parts), h0 = (u % parts) * gp;
      visible(sq, r, slots);
      const int64_t L = int64_t(slots.size());
      e.resize(size_t(gp) * std::max<int64_t>(L, 1));
      const float* qs[8];
      float* outs[8];
      for (int h = 0; h < gp; ++h) {
        qs[h] = qp + ((kv * group + h0 + h) * rows + sq.r0 + r) * D;
        outs[h] = op + ((kv * group + h0 + h) * rows + sq.r0 + r) * D;
      }
      const float* kb = sq.k + kv * sq.S * D;
      const float* vb = sq.v + kv * sq.S * D;
      scores_part(qs, gp, kb, slots.data(), L, D, sc, cap, e.data());
      float denom[8];
      attend_softmax(gp, L, e.data(), denom);
      values_part(gp, vb, slots.data(), L, D, D, e.data(), denom, acc.data(), outs);
    }
  });
}

void check_queries(const at::Tensor& q, int64_t KV) {
  check(q.scalar_type() == at::kFloat, "attend wants float32 queries, keys and values");
  check(q.dim() == 3, "attend: q [H, n, D], keys/values [KV, S, D]");
  const int64_t H = q.size(0), D = q.size(2);
  check(KV > 0 && H % KV == 0 && H / KV <= 8 && D % 16 == 0,
        "attend: shapes (head size a multiple of 16, at most 8 query heads per key/value head)");
}

at::Tensor attend(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, int64_t start,
                  const at::Tensor& positions, const at::Tensor& tree, int64_t window, double scale,
                  double softcap, int64_t split) {
  check(keys.dim() == 3, "attend: q [H, n, D], keys/values [KV, S, D]");
  const int64_t KV = keys.size(0);
  check_queries(q, KV);
  const int64_t H = q.size(0), n = q.size(1), D = q.size(2);
  at::Tensor pos_t, tree_t;
  const std::vector<AttnSeq> seqs{attn_seq(keys, values, start, positions, tree, 0, n, KV, D, pos_t, tree_t)};
  auto qc = q.contiguous();
  auto out = at::empty({H, n, D}, q.options());
  attend_rows(qc.data_ptr<float>(), out.data_ptr<float>(), n, H, KV, D, seqs, window, float(scale), float(softcap),
              split);
  return out;
}

// ---------------------------------------------------------------- one decoder layer per call
// What NativeModel._layer does for a quantized float32 model with exact attention, op for op and
// through the same functions (qlinear, rmsnorm, rope, attend) and ATen kernels (add, mul, gelu or
// silu), so the bits are those of the Python path; only the ~30 Python-level calls per layer
// and their dispatch go. Weights come as segments (stacked along the output dimension, like
// QuantWeight): meta holds, per weight (qkv, o, gate_up, down), its segment count and then
// (group, zero, signed, n, bits) per segment; ws/as/cs hold the segments' tensors in that order.
// norms: input, post-attention, pre-FFN, post-FFN, q, k (an empty tensor where a model has none).
// timing: empty, or float64 [2] to which the seconds in matmuls and in attention are added.
struct Seg {
  at::Tensor w, a, c;
  int64_t group, zero, n, bits;
  bool sgn;
};

using Clock = std::chrono::steady_clock;

inline double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

at::Tensor qlin(const at::Tensor& x, const std::vector<Seg>& segs, double& seconds) {
  const auto t0 = Clock::now();
  const int64_t K = x.size(-1);
  const XPrep xp = prepare(x.reshape({-1, K}));
  std::vector<at::Tensor> outs;
  outs.reserve(segs.size());
  for (const Seg& s : segs)
    outs.push_back(qlinear_prepared(xp, s.w, s.a, s.c, s.group, s.zero, s.sgn, s.n, s.bits, -1));
  at::Tensor y = outs.size() == 1 ? outs[0] : at::cat(outs, -1);
  seconds += since(t0);
  return y;
}

using LayerWeightSet = std::array<std::vector<Seg>, 4>;  // qkv, o, gate_up, down

// the segments of the four weights from the flat lists `layer` and LayerStack take (see above);
// *at_meta and *at_seg advance past them
LayerWeightSet parse_weights(at::TensorList ws, at::TensorList as, at::TensorList cs, at::IntArrayRef meta,
                             size_t* at_meta, size_t* at_seg) {
  check(ws.size() == as.size() && ws.size() == cs.size(), "layer: segment lists differ in length");
  LayerWeightSet weights;
  for (int i = 0; i < 4; ++i) {
    check(*at_meta < meta.size(), "layer: meta too short");
    const int64_t count = meta[(*at_meta)++];
    for (int64_t j = 0; j < count; ++j) {
      check(*at_meta + 5 <= meta.size() && *at_seg < ws.size(), "layer: meta and segments disagree");
      const size_t m = *at_meta, sg = *at_seg;
      weights[i].push_back(Seg{ws[sg], as[sg], cs[sg], meta[m], meta[m + 1], meta[m + 3], meta[m + 4], meta[m + 2] != 0});
      *at_meta += 5;
      ++*at_seg;
    }
    check(!weights[i].empty(), "layer: a weight without segments");
  }
  return weights;
}

// One sequence's part of a layer's attention: its rows (n of them, after those of the sequences
// before it), its cache tensors [KV, S, D] and where its new tokens go and see (as attend takes).
struct SeqAttention {
  const at::Tensor* keys;
  const at::Tensor* values;
  int64_t start;
  const at::Tensor* positions;
  const at::Tensor* tree;
  int64_t n;
};

// Rows r0 .. r0 + n - 1 of src ([KV, rows, D] float32, any strides but the last 1) into slots
// start .. start + n - 1 of a cache tensor ([KV, S, D], contiguous: attn_seq checks it): plain
// copies, as copy_ made them, without its ~3 us of setup per call (two per layer and token).
void write_rows(const at::Tensor& cache, const at::Tensor& src, int64_t start, int64_t r0, int64_t n) {
  check(src.scalar_type() == at::kFloat && src.dim() == 3 && src.stride(2) == 1, "layer: keys/values rows");
  check(cache.scalar_type() == at::kFloat && cache.is_contiguous() && cache.dim() == 3 &&
            cache.size(0) == src.size(0) && cache.size(2) == src.size(2) && start + n <= cache.size(1),
        "layer: cache tensors must be [KV, S, D] float32 with room for the new rows");
  const int64_t KV = src.size(0), D = src.size(2), S = cache.size(1);
  const float* sp = src.data_ptr<float>();
  float* cp = cache.data_ptr<float>();
  for (int64_t h = 0; h < KV; ++h)
    for (int64_t r = 0; r < n; ++r)
      std::memcpy(cp + (h * S + start + r) * D, sp + h * src.stride(0) + (r0 + r) * src.stride(1),
                  size_t(D) * sizeof(float));
}

// One decoder layer; norms: six tensors (input, post-attention, pre-FFN, post-FFN, q, k). The rows
// of x belong to the sequences `seqs` in order: everything but attention runs on all rows at
// once (each weight read once), attention per sequence against its own cache.
at::Tensor layer_body(const at::Tensor& x, const LayerWeightSet& weights, const at::Tensor* norms, double eps,
                      const std::vector<SeqAttention>& seqs, int64_t window, double scale, double softcap,
                      const at::Tensor& cos, const at::Tensor& sin, int64_t nh, int64_t nkv, int64_t hd, bool gelu,
                      double& t_weights, double& t_attention) {
  check(x.dim() == 2 && x.scalar_type() == at::kFloat, "layer: x must be [n, hidden] float32");
  const int64_t n = x.size(0);
  const at::Tensor &input_norm = norms[0], &post_attn = norms[1], &pre_ffn = norms[2], &post_ffn = norms[3],
                   &q_norm = norms[4], &k_norm = norms[5];
  at::Tensor h = rmsnorm(x, input_norm, eps);
  at::Tensor qkv = qlin(h, weights[0], t_weights);
  auto parts = qkv.split_with_sizes({nh * hd, nkv * hd, nkv * hd}, -1);
  at::Tensor k = parts[1].view({n, nkv, hd}).transpose(0, 1);
  at::Tensor v = parts[2].view({n, nkv, hd}).transpose(0, 1);
  at::Tensor q = parts[0].view({n, nh, hd}).transpose(0, 1);
  if (q_norm.numel()) q = rmsnorm(q, q_norm, eps);
  q = rope(q, cos, sin);
  if (k_norm.numel()) k = rmsnorm(k, k_norm, eps);
  k = rope(k, cos, sin);
  // the new keys and values into each sequence's cache; every sequence's attention in one loop
  std::vector<AttnSeq> rows(seqs.size());
  std::vector<at::Tensor> held(2 * seqs.size());
  int64_t r0 = 0;
  for (size_t b = 0; b < seqs.size(); ++b) {
    const SeqAttention& sq = seqs[b];
    check(sq.n >= 1 && r0 + sq.n <= n, "layer: the sequences' rows must add up to x's");
    write_rows(*sq.keys, k, sq.start, r0, sq.n);
    write_rows(*sq.values, v, sq.start, r0, sq.n);
    rows[b] = attn_seq(*sq.keys, *sq.values, sq.start, *sq.positions, *sq.tree, r0, sq.n, nkv, hd, held[2 * b],
                       held[2 * b + 1]);
    r0 += sq.n;
  }
  check(r0 == n, "layer: the sequences' rows must add up to x's");
  check_queries(q, nkv);
  const auto t0 = Clock::now();
  auto qc = q.contiguous();
  at::Tensor att = at::empty({nh, n, hd}, q.options());
  attend_rows(qc.data_ptr<float>(), att.data_ptr<float>(), n, nh, nkv, hd, rows, window, float(scale),
              float(softcap));
  t_attention += since(t0);
  at::Tensor a = qlin(att.transpose(0, 1).reshape({n, nh * hd}), weights[1], t_weights);
  at::Tensor xr;
  if (pre_ffn.numel()) {
    xr = x + rmsnorm(a, post_attn, eps);
    h = rmsnorm(xr, pre_ffn, eps);
  } else {
    xr = x + a;
    h = rmsnorm(xr, post_attn, eps);
  }
  at::Tensor gu = qlin(h, weights[2], t_weights);
  auto halves = gu.chunk(2, -1);
  at::Tensor act = gelu ? at::gelu(halves[0], "tanh") : at::silu(halves[0]);
  at::Tensor mlp = qlin(act * halves[1], weights[3], t_weights);
  if (post_ffn.numel()) mlp = rmsnorm(mlp, post_ffn, eps);
  return xr + mlp;
}

void add_timing(const at::Tensor& timing, double t_weights, double t_attention) {
  if (!timing.numel()) return;
  check(timing.scalar_type() == at::kDouble && timing.numel() == 2, "layer: timing must be float64 [2]");
  double* tp = timing.data_ptr<double>();
  tp[0] += t_weights;
  tp[1] += t_attention;
}

at::Tensor layer(const at::Tensor& x, at::TensorList ws, at::TensorList as, at::TensorList cs, at::IntArrayRef meta,
                 at::TensorList norms, double eps, const at::Tensor& keys, const at::Tensor& values, int64_t start,
                 const at::Tensor& positions, const at::Tensor& tree, int64_t window, double scale, double softcap,
                 const at::Tensor& cos, const at::Tensor& sin, int64_t nh, int64_t nkv, int64_t hd, bool gelu,
                 const at::Tensor& timing) {
  check(norms.size() == 6, "layer: six norms (empty where absent)");
  size_t at_meta = 0, at_seg = 0;
  const LayerWeightSet weights = parse_weights(ws, as, cs, meta, &at_meta, &at_seg);
  double t_weights = 0.0, t_attention = 0.0;
  const std::vector<SeqAttention> seqs{SeqAttention{&keys, &values, start, &positions, &tree, x.size(0)}};
  at::Tensor out = layer_body(x, weights, norms.data(), eps, seqs, window, scale, softcap, cos, sin, nh, nkv, hd,
                              gelu, t_weights, t_attention);
  add_timing(timing, t_weights, t_attention);
  return out;
}

// Every layer of a model in one call: `layer` per layer with the weights and norms bound once.
// A call through the dispatcher with ~50 arguments cost about 45 us on an AMD EPYC (Zen 3),
// 0.8 ms per token of the embedded model's 18 layers; one call now. Built from the lists
// `layer` takes, concatenated over the layers (meta: each layer's own, one after another;
// norms: six per layer).
struct LayerStack : torch::CustomClassHolder {
  std::vector<LayerWeightSet> weights;
  std::vector<at::Tensor> norms;  // 6 per layer
  int64_t nh, nkv, hd;
  bool gelu;
  double eps, scale, softcap;

  LayerStack(std::vector<at::Tensor> ws, std::vector<at::Tensor> as, std::vector<at::Tensor> cs,
             std::vector<int64_t> meta, std::vector<at::Tensor> norms_, int64_t nh_, int64_t nkv_, int64_t hd_,
             bool gelu_, double eps_, double scale_, double softcap_)
      : norms(std::move(norms_)), nh(nh_), nkv(nkv_), hd(hd_), gelu(gelu_), eps(eps_), scale(scale_),
        softcap(softcap_) {
    check(norms.size() % 6 == 0, "LayerStack: six norms per layer");
    size_t at_meta = 0, at_seg = 0;
    for (size_t i = 0; i < norms.size() / 6; ++i) weights.push_back(parse_weights(ws, as, cs, meta, &at_meta, &at_seg));
    check(at_meta == meta.size() && at_seg == ws.size(), "LayerStack: meta and segments disagree");
  }

  // x through layers first .. last - 1; layer i reads and writes keys[i] / values[i], sees
  // windows[i] (0: all) and takes the rotary tables cos[ropes[i]] / sin[ropes[i]]
  at::Tensor run(at::Tensor x, int64_t first, int64_t last, std::vector<at::Tensor> keys,
                 std::vector<at::Tensor> values, int64_t start, at::Tensor positions, at::Tensor tree,
                 std::vector<int64_t> windows, std::vector<int64_t> ropes, std::vector<at::Tensor> cos,
                 std::vector<at::Tensor> sin, at::Tensor timing) {
    const int64_t L = int64_t(weights.size());
    check(0 <= first && first <= last && last <= L, "LayerStack.run: layers out of range");
    check(int64_t(keys.size()) == L && int64_t(values.size()) == L, "LayerStack.run: one cache tensor per layer");
    return layers(x, first, last, keys, values, {start}, {positions}, {tree}, {x.size(0)}, windows, ropes, cos, sin,
                  timing);
  }

  // Every layer for the rows of several sequences at once (a server step): x holds sequence 0's
  // sizes[0] rows, then sequence 1's, ...; sequence b's cache tensors of layer i are keys[b * L + i]
  // / values[b * L + i], its new tokens go to slots starts[b] .. with positions[b] and trees[b]
  // (empty: a chain); cos / sin hold every row's rotary tables, in the same row order.
  at::Tensor run_batch(at::Tensor x, std::vector<at::Tensor> keys, std::vector<at::Tensor> values,
                       std::vector<int64_t> starts, std::vector<at::Tensor> positions, std::vector<at::Tensor> trees,
                       std::vector<int64_t> sizes, std::vector<int64_t> windows, std::vector<int64_t> ropes,
                       std::vector<at::Tensor> cos, std::vector<at::Tensor> sin, at::Tensor timing) {
    const int64_t L = int64_t(weights.size());
    check(keys.size() == sizes.size() * size_t(L) && values.size() == sizes.size() * size_t(L),
          "LayerStack.run_batch: one cache tensor per sequence and layer");
    return layers(x, 0, L, keys, values, starts, positions, trees, sizes, windows, ropes, cos, sin, timing);
  }

 private:
  // layers first .. last - 1 for the sequences of run_batch (run: one sequence); sequence b's
  // cache tensors of layer i are keys[b * L + i] / values[b * L + i]
  at::Tensor layers(at::Tensor x, int64_t first, int64_t last, const std::vector<at::Tensor>& keys,
                    const std::vector<at::Tensor>& values, const std::vector<int64_t>& starts,
                    const std::vector<at::Tensor>& positions, const std::vector<at::Tensor>& trees,
                    const std::vector<int64_t>& sizes, const std::vector<int64_t>& windows,
                    const std::vector<int64_t>& ropes, const std::vector<at::Tensor>& cos,
                    const std::vector<at::Tensor>& sin, const at::Tensor& timing) {
    const int64_t L = int64_t(weights.size());
    const size_t B = sizes.size();
    check(B >= 1 && starts.size() == B && positions.size() == B && trees.size() == B,
          "LayerStack: a start, positions, tree and size per sequence");
    check(int64_t(windows.size()) == L && int64_t(ropes.size()) == L, "LayerStack: a window and rotary index per layer");
    std::vector<at::Tensor> pos(B);
    for (size_t b = 0; b < B; ++b) pos[b] = positions[b].to(at::kLong).contiguous();
    double t_weights = 0.0, t_attention = 0.0;
    std::vector<SeqAttention> seqs(B);
    for (int64_t i = first; i < last; ++i) {
      const int64_t r = ropes[i];
      check(0 <= r && r < int64_t(cos.size()) && cos.size() == sin.size(), "LayerStack: rotary index");
      for (size_t b = 0; b < B; ++b)
        seqs[b] = SeqAttention{&keys[b * L + i], &values[b * L + i], starts[b], &pos[b], &trees[b], sizes[b]};
      x = layer_body(x, weights[i], norms.data() + 6 * i, eps, seqs, windows[i], scale, softcap, cos[r], sin[r], nh,
                     nkv, hd, gelu, t_weights, t_attention);
    }
    add_timing(timing, t_weights, t_attention);
    return x;
  }
};

// ---------------------------------------------------------------- rows of a weight, dequantized
// Output rows `rows` of an 8-bit packed weight as float32, a * float(q - zero) - c, the
// arithmetic of kernels.dequantize_rows (no fused multiply-add): an embedding lookup of one
// token took about 0.3 ms in its ~15 PyTorch ops, a row here a few microseconds.
at::Tensor dequant_rows(const at::Tensor& w, const at::Tensor& a, const at::Tensor& c, const at::Tensor& rows,
                        int64_t group, int64_t zero, bool is_signed, int64_t n) {
  check(group == 16 || group == 32, "group must be 16 or 32");
  check(w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 5 && w.size(2) == group / 4 &&
            w.size(3) == LANES && w.size(4) == 4,
        "dequant_rows: w must be the 8-bit layout [NG, NB, G/4, 16, 4]");
  const int64_t NG = w.size(0), NB = w.size(1), K = NB * group;
  const bool half = a.scalar_type() == at::kHalf;
  check((half || a.scalar_type() == at::kFloat) && a.is_contiguous() && a.numel() == NG * NB * LANES,
        "dequant_rows: a must be float32 or float16 [NG, NB, 16]");
  const bool hasc = c.numel() != 0;
  if (hasc) check(c.scalar_type() == at::kFloat && c.is_contiguous() && c.numel() == NG * NB * LANES, "dequant_rows: c");
  auto ids = rows.to(at::kLong).contiguous();
  const int64_t R = ids.numel();
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) check(0 <= id[r] && id[r] < n, "dequant_rows: a row out of range");
  auto out = at::empty({R, K}, a.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* af = half ? nullptr : a.data_ptr<float>();
  const uint16_t* ah = half ? reinterpret_cast<const uint16_t*>(a.data_ptr<at::Half>()) : nullptr;
  const float* cp = hasc ? c.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int zz = int(zero);
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t g = id[r] / LANES, lane = id[r] % LANES;
      for (int64_t j = 0; j < NB; ++j) {
        const int64_t at = (g * NB + j) * LANES + lane;
        const float scale = half ? half_to_float(ah[at]) : af[at];
        const uint8_t* blk = wp + ((g * NB + j) * (group / 4)) * 64 + lane * 4;
        float* dst = op + r * K + j * group;
        for (int64_t t = 0; t < group; ++t) {
          const uint8_t raw = blk[(t / 4) * 64 + t % 4];
          const int v = (is_signed ? int(int8_t(raw)) : int(raw)) - zz;
          float y = scale * float(v);
          if (hasc) y = y - cp[at];
          dst[t] = y;
        }
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------- argmax over logits rows
// torch.argmax(x, -1) for float32 rows, the same answer (the first index of the largest value;
// a NaN counts as the largest, the first NaN wins) in a fraction of its time: the rows of a
// 262,144-token vocabulary cut into chunks that run on all threads, each chunk a vector max and
// then a search for its first index, the chunks combined in order.
struct Best {
  float v;
  int64_t i;
  bool nan;
};

// what the vector paths leave to scalar code: the largest of m and x[i .. n) that is not a NaN
// (nan becomes true on a NaN), the first NaN's index, and the first index from i with x == m
// (0 when there is none: only for an empty chunk)
inline float rest_max(const float* x, int64_t i, int64_t n, float m, bool& nan) {
  for (int64_t t = i; t < n; ++t) {
    if (x[t] != x[t]) nan = true;
    else if (x[t] > m) m = x[t];
  }
  return m;
}

inline int64_t first_nan(const float* x, int64_t n) {
  for (int64_t t = 0; t < n; ++t)
    if (x[t] != x[t]) return t;
  return 0;
}

inline int64_t first_equal(const float* x, int64_t i, int64_t n, float m) {
  for (int64_t t = i; t < n; ++t)
    if (x[t] == m) return t;
  return 0;
}

__attribute__((target("avx512f"))) Best chunk_best_avx512(const float* x, int64_t n) {
  __m512 vm = _mm512_set1_ps(-INFINITY);
  __mmask16 unord = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    unord |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vm = _mm512_max_ps(vm, v);
  }
  bool nan = unord != 0;
  const float m = rest_max(x, i, n, _mm512_reduce_max_ps(vm), nan);
  if (nan) return Best{NAN, first_nan(x, n), true};
  const __m512 mv = _mm512_set1_ps(m);
  for (i = 0; i + 16 <= n; i += 16) {
    const __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), mv, _CMP_EQ_OQ);
    if (eq) return Best{m, i + __builtin_ctz(unsigned(eq)), false};
  }
  return Best{m, first_equal(x, i, n, m), false};
}

// the same with 8 lanes (AVX2): the AMD EPYC (Zen 3) here has no AVX-512, and the scalar loop
// below took about 0.2 ms per 262,144-token row, once per sequence per step
__attribute__((target("avx2"))) Best chunk_best_avx2(const float* x, int64_t n) {
  __m256 vm0 = _mm256_set1_ps(-INFINITY), vm1 = vm0;
  __m256 unord = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    unord = _mm256_or_ps(unord, _mm256_or_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q), _mm256_cmp_ps(b, b, _CMP_UNORD_Q)));
    vm0 = _mm256_max_ps(vm0, a);
    vm1 = _mm256_max_ps(vm1, b);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(vm0, vm1));
  bool nan = _mm256_movemask_ps(unord) != 0;
  const float m = rest_max(lanes, 0, 8, rest_max(x, i, n, -INFINITY, nan), nan);
  if (nan) return Best{NAN, first_nan(x, n), true};
  const __m256 mv = _mm256_set1_ps(m);
  for (i = 0; i + 8 <= n; i += 8) {
    const int eq = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), mv, _CMP_EQ_OQ));
    if (eq) return Best{m, i + __builtin_ctz(unsigned(eq)), false};
  }
  return Best{m, first_equal(x, i, n, m), false};
}

Best chunk_best_generic(const float* x, int64_t n) {
  Best b{-INFINITY, 0, false};
  bool any = false;
  for (int64_t t = 0; t < n; ++t) {
    if (x[t] != x[t]) return Best{NAN, t, true};
    if (!any || x[t] > b.v) {
      b.v = x[t];
      b.i = t;
      any = true;
    }
  }
  return b;
}

// path: -1 the best this CPU has, else at most 0 (scalar), 1 (AVX2) or 2 (AVX-512), so that a
// test checks every path the machine can run
at::Tensor argmax_rows(const at::Tensor& x, int64_t path) {
  check(x.dim() == 2 && x.scalar_type() == at::kFloat, "argmax_rows: x must be [M, V] float32");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), V = xc.size(1);
  check(V > 0, "argmax_rows: empty rows");
  auto out = at::empty({M}, xc.options().dtype(at::kLong));
  constexpr int64_t CH = 16384;
  const int64_t chunks = (V + CH - 1) / CH;
  std::vector<Best> best(size_t(M * chunks));
  const float* xp = xc.data_ptr<float>();
  const int64_t isa = std::min<int64_t>(best_isa(), 2);
  const int64_t use = path < 0 || path > isa ? isa : path;
  auto chunk_best = use == 2 ? chunk_best_avx512 : use == 1 ? chunk_best_avx2 : chunk_best_generic;
  at::parallel_for(0, M * chunks, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / chunks, c = t % chunks;
      const int64_t lo = c * CH, n = std::min(CH, V - lo);
      Best b = chunk_best(xp + r * V + lo, n);
      b.i += lo;
      best[size_t(t)] = b;
    }
  });
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < M; ++r) {
    Best b = best[size_t(r * chunks)];
    for (int64_t c = 1; c < chunks && !b.nan; ++c) {
      const Best& o = best[size_t(r * chunks + c)];
      if (o.nan || o.v > b.v) b = o;
    }
    op[r] = b.i;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(genrefine_q, m) {
  m.class_<LayerStack>("LayerStack")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>,
                       std::vector<at::Tensor>, int64_t, int64_t, int64_t, bool, double, double, double>())
      .def("run", &LayerStack::run)
      .def("run_batch", &LayerStack::run_batch);
  m.def("qlinear(Tensor x, Tensor w, Tensor a, Tensor c, int group, int zero, bool is_signed, int n, int bits, int isa) -> Tensor");
  m.def("quantize(Tensor x, int path=-1) -> (Tensor, Tensor, Tensor)");
  m.def("best_isa() -> int");
  m.def("rmsnorm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("layer(Tensor x, Tensor[] ws, Tensor[] as_, Tensor[] cs, int[] meta, Tensor[] norms, float eps, Tensor keys, Tensor values, int start, Tensor positions, Tensor tree, int window, float scale, float softcap, Tensor cos, Tensor sin, int nh, int nkv, int hd, bool gelu, Tensor timing) -> Tensor");
  m.def("argmax_rows(Tensor x, int path=-1) -> Tensor");
  m.def("dequant_rows(Tensor w, Tensor a, Tensor c, Tensor rows, int group, int zero, bool is_signed, int n) -> Tensor");
  m.def("attend(Tensor q, Tensor keys, Tensor values, int start, Tensor positions, Tensor tree, int window, float scale, float softcap, int split=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(genrefine_q, CPU, m) {
  m.impl("qlinear", &qlinear);
  m.impl("quantize", &quantize_op);
  m.impl("rmsnorm", &rmsnorm);
  m.impl("rope", &rope);
  m.impl("attend", &attend);
  m.impl("layer", &layer);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("dequant_rows", &dequant_rows);
}

TORCH_LIBRARY_IMPL(genrefine_q, CatchAll, m) { m.impl("best_isa", &isa_op); }
