// AVX2 + FMA loops (compiled for x86-64-v3; called only after a runtime CPU check).
//
// compress: for every 4 consecutive elements of a tile, the 16 signed sums ±x0±x1±x2±x3 are
//   tabulated once (two 8-float tables, split on the sign of x3); then 8 bases at a time, each
//   nibble of a Philox word picks its sum with two vpermps and a blend. Δ is read once per tile
//   whatever the number of bases.
// reconstruct: the Philox words of every basis for a tile are generated first; then each stripe
//   of 32 outputs keeps its accumulators in registers while all bases pass, adding ±gamma_k in
//   k order exactly as the spec does.
//
// This file is compiled with -march=x86-64-v3 while the rest is not, so it instantiates no
// template and defines no inline function with external linkage: the linker could otherwise
// pick this file's AVX2 copy for the portable code too.
#include <immintrin.h>

#include <cstdlib>

#include "convert.hpp"
#include "kernels.hpp"
#include "philox.hpp"

namespace ferret::detail {
namespace {

int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Scratch memory without std::vector (see the note at the top).
struct Scratch {
  void* p;
  explicit Scratch(size_t bytes) : p(std::calloc(bytes ? bytes : 1, 1)) {}
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

struct RoundKeys {
  __m256i k0[kPhiloxRounds], k1[kPhiloxRounds];
  explicit RoundKeys(uint64_t seed) {
    uint32_t a = uint32_t(seed), b = uint32_t(seed >> 32);
    for (int r = 0; r < kPhiloxRounds; r++) {
      k0[r] = _mm256_set1_epi32(int(a));
      k1[r] = _mm256_set1_epi32(int(b));
      a += kPhiloxW0;
      b += kPhiloxW1;
    }
  }
};

// Eight Philox4x32-10 evaluations with counters (c0[l], c1[l], 0, 0).
inline void philox8(__m256i c0, __m256i c1, const RoundKeys& key, __m256i out[4]) {
  const __m256i m0 = _mm256_set1_epi32(int(kPhiloxM0)), m1 = _mm256_set1_epi32(int(kPhiloxM1));
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
#pragma GCC unroll 10
  for (int r = 0; r < kPhiloxRounds; r++) {
    const __m256i a_even = _mm256_mul_epu32(c0, m0), a_odd = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
    const __m256i b_even = _mm256_mul_epu32(c2, m1), b_odd = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
    const __m256i a_hi = _mm256_blend_epi32(_mm256_srli_epi64(a_even, 32), a_odd, 0xAA);
    const __m256i a_lo = _mm256_blend_epi32(a_even, _mm256_slli_epi64(a_odd, 32), 0xAA);
    const __m256i b_hi = _mm256_blend_epi32(_mm256_srli_epi64(b_even, 32), b_odd, 0xAA);
    const __m256i b_lo = _mm256_blend_epi32(b_even, _mm256_slli_epi64(b_odd, 32), 0xAA);
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(b_hi, c1), key.k0[r]);
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(a_hi, c3), key.k1[r]);
    c1 = b_lo;
    c3 = a_lo;
    c0 = n0;
    c2 = n2;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// A function, not a global: no AVX instruction may run before the runtime CPU check.
inline __m256i lanes() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }

void rademacher_compress(const void* x, DType dt, int64_t start, int64_t lo, int64_t hi, uint64_t seed,
                         int n_coords, double* partial) {
  const RoundKeys key(seed);
  const int padded = (n_coords + 7) & ~7;
  Scratch sums_mem(sizeof(double) * padded);
  double* sums = static_cast<double*>(sums_mem.p);
  alignas(32) float tile[kTile];
  alignas(32) __m256 plus[kTile / 4], minus[kTile / 4];  // sums with +x3 / -x3, indexed by 3 sign bits
  const __m256 s0 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
  const __m256 s1 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
  const __m256 s2 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  for (int64_t t0 = lo / kTile * kTile; t0 < hi; t0 += kTile) {
    fill_tile(tile, x, dt, start, lo, hi, t0);
    for (int s = 0; s < kTile / 4; s++) {
      __m256 t = _mm256_mul_ps(_mm256_set1_ps(tile[4 * s]), s0);
      t = _mm256_fmadd_ps(_mm256_set1_ps(tile[4 * s + 1]), s1, t);
      t = _mm256_fmadd_ps(_mm256_set1_ps(tile[4 * s + 2]), s2, t);
      const __m256 x3 = _mm256_set1_ps(tile[4 * s + 3]);
      plus[s] = _mm256_add_ps(t, x3);
      minus[s] = _mm256_sub_ps(t, x3);
    }
    const uint32_t group0 = uint32_t(t0 >> 7);
    for (int kb = 0; kb < padded; kb += 8) {
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      const __m256i basis = _mm256_add_epi32(_mm256_set1_epi32(kb), lanes());
      for (int g = 0; g < kTile / 128; g++) {
        __m256i words[4];
        philox8(_mm256_set1_epi32(int(group0 + g)), basis, key, words);
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
          const __m256i r = words[j];
          const __m256* tp = plus + g * 32 + j * 8;
          const __m256* tm = minus + g * 32 + j * 8;
#pragma GCC unroll 8
          for (int m = 0; m < 8; m++) {
            const __m256i idx = _mm256_srli_epi32(r, 4 * m);
            const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(r, 28 - 4 * m));
            const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tp[m], idx),
                                              _mm256_permutevar8x32_ps(tm[m], idx), sel);
            acc[m & 3] = _mm256_add_ps(acc[m & 3], v);
          }
        }
      }
      alignas(32) float lane_sums[8];
      _mm256_store_ps(lane_sums, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
      for (int l = 0; l < 8; l++) sums[kb + l] += lane_sums[l];
    }
  }
  for (int k = 0; k < n_coords; k++) partial[k] = sums[k];
}

void rademacher_reconstruct(void* out, DType dt, int64_t start, int64_t lo, int64_t hi, uint64_t seed,
                            const float* gamma, int n_coords, float scale) {
  const RoundKeys key(seed);
  Scratch words_mem(sizeof(uint32_t) * 32 * size_t(n_coords));
  uint32_t* words = static_cast<uint32_t*>(words_mem.p);  // [k][word j][group l]
  alignas(32) float acc_tile[kTile];
  const __m256i shift[4] = {_mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24),
                            _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16),
                            _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8),
                            _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0)};
  for (int64_t t0 = lo / kTile * kTile; t0 < hi; t0 += kTile) {
    const __m256i groups = _mm256_add_epi32(_mm256_set1_epi32(int(t0 >> 7)), lanes());
    for (int k = 0; k < n_coords; k++) {
      __m256i w[4];
      philox8(groups, _mm256_set1_epi32(k), key, w);
      for (int j = 0; j < 4; j++) _mm256_storeu_si256(reinterpret_cast<__m256i*>(&words[size_t(k) * 32 + j * 8]), w[j]);
    }
    for (int l = 0; l < 8; l++)
      for (int j = 0; j < 4; j++) {
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        const uint32_t* wk = &words[j * 8 + l];
        for (int k = 0; k < n_coords; k++) {
          const __m256i w = _mm256_set1_epi32(int(wk[size_t(k) * 32]));
          const __m256 pos = _mm256_set1_ps(gamma[k]), neg = _mm256_set1_ps(-gamma[k]);
#pragma GCC unroll 4
          for (int q = 0; q < 4; q++)
            acc[q] = _mm256_add_ps(acc[q], _mm256_blendv_ps(pos, neg, _mm256_castsi256_ps(_mm256_sllv_epi32(w, shift[q]))));
        }
        for (int q = 0; q < 4; q++) _mm256_store_ps(acc_tile + l * 128 + j * 32 + 8 * q, acc[q]);
      }
    const int64_t a = max64(lo, t0), b = min64(hi, t0 + kTile);
    apply_update(out, dt, a - start, acc_tile + (a - t0), b - a, scale);
  }
}

}  // namespace

const ChunkKernels kRademacherAvx2 = {rademacher_compress, rademacher_reconstruct};

}  // namespace ferret::detail
