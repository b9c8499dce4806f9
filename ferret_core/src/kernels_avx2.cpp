// AVX2 + FMA loops (compiled for x86-64-v3; called only after a runtime CPU check).
//
// compress: every word of 32 elements of a tile is cut into ten groups of 3 elements and one of 2;
//   the 8 signed sums ±x0±x1±x2 of each group are tabulated once per tile. Then 8 bases at a
//   time, each group's sign bits pick their sum with one vpermps. Δ is read once per tile
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
#include "tree.hpp"

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
  uint32_t s0[kPhiloxRounds], s1[kPhiloxRounds];
  __m256i k0[kPhiloxRounds], k1[kPhiloxRounds];
  explicit RoundKeys(uint64_t seed) {
    uint32_t a = uint32_t(seed), b = uint32_t(seed >> 32);
    for (int r = 0; r < kPhiloxRounds; r++) {
      s0[r] = a;
      s1[r] = b;
      k0[r] = _mm256_set1_epi32(int(a));
      k1[r] = _mm256_set1_epi32(int(b));
      a += kPhiloxW0;
      b += kPhiloxW1;
    }
  }
};

inline __m256i splat(uint32_t v) { return _mm256_set1_epi32(int(v)); }

// Lane-wise 32x32 -> 64-bit products of a and m, split into high and low words.
inline void mulhilo(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// Philox rounds 2..9 on eight lanes; the first two rounds are done by the callers, where one
// counter word is the same in every lane and half of the multiplications are scalar.
inline void philox8_rounds(__m256i c[4], const RoundKeys& key) {
  const __m256i m0 = splat(kPhiloxM0), m1 = splat(kPhiloxM1);
#pragma GCC unroll 8
  for (int r = 2; r < kPhiloxRounds; r++) {
    __m256i a_hi, a_lo, b_hi, b_lo;
    mulhilo(c[0], m0, a_hi, a_lo);
    mulhilo(c[2], m1, b_hi, b_lo);
    c[0] = _mm256_xor_si256(_mm256_xor_si256(b_hi, c[1]), key.k0[r]);
    c[2] = _mm256_xor_si256(_mm256_xor_si256(a_hi, c[3]), key.k1[r]);
    c[1] = b_lo;
    c[3] = a_lo;
  }
}

// Eight Philox4x32-10 evaluations with counters (group, k[l], 0, 0): compress's layout.
inline void philox8_bases(uint32_t group, __m256i k, const RoundKeys& key, __m256i c[4]) {
  const uint64_t p0 = uint64_t(kPhiloxM0) * group;  // round 0: the c2 product is 0
  const uint32_t c2 = uint32_t(p0 >> 32) ^ key.s1[0], c3 = uint32_t(p0);
  const __m256i c0 = _mm256_xor_si256(k, key.k0[0]);
  const uint64_t p1 = uint64_t(kPhiloxM1) * c2;  // round 1: c2 is scalar, c0 is not
  __m256i a_hi, a_lo;
  mulhilo(c0, splat(kPhiloxM0), a_hi, a_lo);
  c[0] = splat(uint32_t(p1 >> 32) ^ key.s0[1]);
  c[1] = splat(uint32_t(p1));
  c[2] = _mm256_xor_si256(_mm256_xor_si256(a_hi, splat(c3)), key.k1[1]);
  c[3] = a_lo;
  philox8_rounds(c, key);
}

// Eight Philox4x32-10 evaluations with counters (group[l], k, 0, 0): reconstruct's layout.
inline void philox8_groups(__m256i group, uint32_t k, const RoundKeys& key, __m256i c[4]) {
  __m256i a_hi, a_lo;  // round 0: the c2 product is 0 and c0 becomes scalar
  mulhilo(group, splat(kPhiloxM0), a_hi, a_lo);
  const uint32_t c0 = k ^ key.s0[0];
  const __m256i c2 = _mm256_xor_si256(a_hi, key.k1[0]);
  const uint64_t p0 = uint64_t(kPhiloxM0) * c0;  // round 1: c0 is scalar, c2 is not
  __m256i b_hi, b_lo;
  mulhilo(c2, splat(kPhiloxM1), b_hi, b_lo);
  c[0] = _mm256_xor_si256(b_hi, key.k0[1]);  // c1 was 0
  c[1] = b_lo;
  c[2] = _mm256_xor_si256(_mm256_xor_si256(splat(uint32_t(p0 >> 32)), a_lo), key.k1[1]);
  c[3] = splat(uint32_t(p0));
  philox8_rounds(c, key);
}

constexpr int kGroupsPerWord = 11;  // 10 groups of 3 sign bits and one of 2

// A function, not a global: no AVX instruction may run before the runtime CPU check.
inline __m256i lanes() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }

void rademacher_compress(const void* x, DType dt, int64_t start, int64_t lo, int64_t hi, uint64_t seed,
                         int n_coords, double* partial) {
  const RoundKeys key(seed);
  const int padded = (n_coords + 7) & ~7;
  constexpr int kGroups = kTile / 128;
  Scratch sums_mem(sizeof(double) * kGroups * padded);
  double* sums = static_cast<double*>(sums_mem.p);  // [group of the tile][basis]
  PairwiseTree tree(n_coords);
  alignas(32) float tile[kTile];
  // For every word of 32 elements: 10 tables of the 8 sums ±x0±x1±x2 over elements 3g..3g+2,
  // and one of the 4 sums ±x30±x31, each indexed by that group's sign bits.
  alignas(32) __m256 tables[kTile / 32][kGroupsPerWord];
  const __m256 s0 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
  const __m256 s1 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
  const __m256 s2 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  for (int64_t t0 = lo / kTile * kTile; t0 < hi; t0 += kTile) {
    fill_tile(tile, x, dt, start, lo, hi, t0);
    for (int w = 0; w < kTile / 32; w++) {
      const float* e = tile + 32 * w;
      for (int g = 0; g < kGroupsPerWord - 1; g++) {
        __m256 t = _mm256_mul_ps(_mm256_set1_ps(e[3 * g]), s0);
        t = _mm256_fmadd_ps(_mm256_set1_ps(e[3 * g + 1]), s1, t);
        tables[w][g] = _mm256_fmadd_ps(_mm256_set1_ps(e[3 * g + 2]), s2, t);
      }
      tables[w][kGroupsPerWord - 1] = _mm256_fmadd_ps(_mm256_set1_ps(e[31]), s1, _mm256_mul_ps(_mm256_set1_ps(e[30]), s0));
    }
    const uint32_t group0 = uint32_t(t0 >> 7);
    for (int kb = 0; kb < padded; kb += 8) {
      const __m256i basis = _mm256_add_epi32(_mm256_set1_epi32(kb), lanes());
      for (int g = 0; g < kGroups; g++) {
        // The spec's group sum: accumulator m mod 4 adds the triples of every word in order.
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        __m256i words[4];
        philox8_bases(group0 + g, basis, key, words);
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
          const __m256i r = words[j];
          const __m256* tw = tables[4 * g + j];
#pragma GCC unroll 11
          for (int m = 0; m < kGroupsPerWord; m++)
            acc[m & 3] = _mm256_add_ps(acc[m & 3], _mm256_permutevar8x32_ps(tw[m], _mm256_srli_epi32(r, 3 * m)));
        }
        const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        double* out = sums + size_t(g) * padded + kb;
        _mm256_storeu_pd(out, _mm256_cvtps_pd(_mm256_castps256_ps128(sum)));
        _mm256_storeu_pd(out + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(sum, 1)));
      }
    }
    // The tile's 8 groups are an aligned subtree: add it here, then the tiles through the tree.
    for (int width = 1; width < kGroups; width *= 2)
      for (int g = 0; g < kGroups; g += 2 * width) {
        double* left = sums + size_t(g) * padded;
        const double* right = sums + size_t(g + width) * padded;
        for (int k = 0; k < padded; k += 4)
          _mm256_storeu_pd(left + k, _mm256_add_pd(_mm256_loadu_pd(left + k), _mm256_loadu_pd(right + k)));
      }
    tree.add(t0 / kTile, sums);
  }
  tree.root(partial);
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
      philox8_groups(groups, uint32_t(k), key, w);
      for (int j = 0; j < 4; j++) _mm256_storeu_si256(reinterpret_cast<__m256i*>(&words[size_t(k) * 32 + j * 8]), w[j]);
    }
    for (int l = 0; l < 8; l++)
      for (int j = 0; j < 4; j += 2) {  // a stripe of 64 outputs: words j and j + 1 of group l
        __m256 acc[8];
        for (int q = 0; q < 8; q++) acc[q] = _mm256_setzero_ps();
        const uint32_t* wk = &words[j * 8 + l];
        for (int k = 0; k < n_coords; k++) {
          const __m256i w0 = _mm256_set1_epi32(int(wk[size_t(k) * 32]));
          const __m256i w1 = _mm256_set1_epi32(int(wk[size_t(k) * 32 + 8]));
          const __m256 pos = _mm256_set1_ps(gamma[k]), neg = _mm256_set1_ps(-gamma[k]);
#pragma GCC unroll 4
          for (int q = 0; q < 4; q++) {
            acc[q] = _mm256_add_ps(acc[q], _mm256_blendv_ps(pos, neg, _mm256_castsi256_ps(_mm256_sllv_epi32(w0, shift[q]))));
            acc[q + 4] = _mm256_add_ps(acc[q + 4], _mm256_blendv_ps(pos, neg, _mm256_castsi256_ps(_mm256_sllv_epi32(w1, shift[q]))));
          }
        }
        for (int q = 0; q < 8; q++) _mm256_store_ps(acc_tile + l * 128 + j * 32 + 8 * q, acc[q]);
      }
    const int64_t a = max64(lo, t0), b = min64(hi, t0 + kTile);
    apply_update(out, dt, a - start, acc_tile + (a - t0), b - a, scale);
  }
}

}  // namespace

const ChunkKernels kRademacherAvx2 = {rademacher_compress, rademacher_reconstruct};

}  // namespace ferret::detail

namespace ferret::detail {

void flip_by_bits_avx2(float* x, int len, uint32_t w) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int e = 0;
  for (; e + 8 <= len; e += 8) {
    const __m256i bit = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(w >> e)), lanes), _mm256_set1_epi32(1));
    const __m256 sign = _mm256_castsi256_ps(_mm256_slli_epi32(bit, 31));
    _mm256_storeu_ps(x + e, _mm256_xor_ps(_mm256_loadu_ps(x + e), sign));
  }
  if (e < len) flip_by_bits_portable(x + e, len - e, w >> e);
}

// Stages 1, 2 and 4 happen inside one vector of 8: each lane pairs with its partner (a permute),
// the low partner keeps a + b and the high one takes a - b (a blend). Wider stages pair vectors.
void fwht_avx2(float* x, int64_t n) {
  if (n < 8) return fwht_portable(x, n);  // no whole vector: the portable loop, same arithmetic
  for (int64_t i = 0; i < n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    __m256 p = _mm256_permute_ps(v, 0xB1);  // h = 1: partners [1 0 3 2 ..]
    v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xAA);
    p = _mm256_permute_ps(v, 0x4E);  // h = 2: partners [2 3 0 1 ..]
    v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xCC);
    p = _mm256_permute2f128_ps(v, v, 0x01);  // h = 4: the other 128-bit half
    v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xF0);
    _mm256_storeu_ps(x + i, v);
  }
  for (int64_t h = 8; h < n; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; j += 8) {
        const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + h);
        _mm256_storeu_ps(x + j, _mm256_add_ps(a, b));
        _mm256_storeu_ps(x + j + h, _mm256_sub_ps(a, b));
      }
}

void sign_words_avx2(uint64_t seed, int64_t g0, int64_t n_groups, uint32_t* words) {
  const RoundKeys key(seed);
  int64_t g = 0;
  for (; g + 8 <= n_groups; g += 8) {
    __m256i c[4];
    philox8_groups(_mm256_add_epi32(splat(uint32_t(g0 + g)), lanes()), 0, key, c);
    alignas(32) uint32_t w[4][8];
    for (int q = 0; q < 4; q++) _mm256_store_si256(reinterpret_cast<__m256i*>(w[q]), c[q]);
    for (int l = 0; l < 8; l++)
      for (int q = 0; q < 4; q++) words[4 * (g + l) + q] = w[q][l];
  }
  for (; g < n_groups; g++) basis_words(seed, 0, uint32_t(g0 + g), words + 4 * g);
}

namespace {

constexpr int64_t kSignTile = 128;  // sign groups per pass of the dense loops (16384 elements)

// The sign-bit masks of elements i .. i + 7 (i a multiple of 8) from the words of group g0 onwards.
inline __m256 sign_mask(const uint32_t* words, int64_t g0, int64_t i) {
  const uint32_t w = words[4 * ((i >> 7) - g0) + ((i >> 5) & 3)] >> (i & 31);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srlv_epi32(_mm256_set1_epi32(int(w)), lanes()), 31));
}

inline float signed_one(const uint32_t* words, int64_t g0, int64_t i, float x) {
  const uint32_t w = words[4 * ((i >> 7) - g0) + ((i >> 5) & 3)];
  return float_of(bits_of(x) ^ (((w >> (i & 31)) & 1u) << 31));
}

}  // namespace

void signed_fold8_avx2(float* dst, const float* const* src, const int64_t* offsets, const int64_t* masks,
                       int64_t len, uint64_t seed, const float* const* next) {
  alignas(32) static thread_local uint32_t words[8][4 * kSignTile];
  alignas(32) static thread_local float zeros[128 * kSignTile];
  for (int64_t t = 0; t < len; t += 128 * kSignTile) {
    const int64_t n = min64(len - t, 128 * kSignTile);
    const float* base[8];
    int64_t low[8];
    __m256i order[8];  // lane e of a vector reads element e ^ (mask & 7) of its source vector
    for (int c = 0; c < 8; c++) {
      const int64_t from = t ^ (masks[c] & ~(n - 1));  // the mask's high bits move whole tiles
      low[c] = masks[c] & (n - 1) & ~int64_t(7);
      order[c] = _mm256_xor_si256(lanes(), splat(uint32_t(masks[c] & 7)));
      base[c] = src[c] ? src[c] + from : zeros;  // an absent chunk reads zeros (its signs only flip 0)
      if (src[c]) sign_words_avx2(seed, (offsets[c] + from) >> 7, n / 128, words[c]);
    }
    // The loop reads each chunk in its lane order, which hardware prefetchers do not follow:
    // while it runs, the lines it reads next (the next tile, or the caller's next chunks) are
    // asked for in address order, four lines every eight lanes.
    const float* ahead[8];
    for (int c = 0; c < 8; c++)
      ahead[c] = t + n < len ? (src[c] ? src[c] + ((t + n) ^ (masks[c] & ~(n - 1))) : nullptr) : next[c];
    for (int64_t j = 0; j < n; j += 8) {
      const int64_t line = 16 * (j >> 4), half = 4 * ((j >> 3) & 1);
      for (int c = half; c < half + 4; c++)
        if (ahead[c]) _mm_prefetch(reinterpret_cast<const char*>(ahead[c] + line), _MM_HINT_T0);
      __m256 s[8];
      for (int c = 0; c < 8; c++) {
        const int64_t p = j ^ low[c];
        const uint32_t w = words[c][4 * (p >> 7) + ((p >> 5) & 3)] >> (p & 31);
        const __m256 mask = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srlv_epi32(_mm256_set1_epi32(int(w)), lanes()), 31));
        s[c] = _mm256_permutevar8x32_ps(_mm256_xor_ps(_mm256_loadu_ps(base[c] + p), mask), order[c]);
      }
      const __m256 left = _mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3]));
      const __m256 right = _mm256_add_ps(_mm256_add_ps(s[4], s[5]), _mm256_add_ps(s[6], s[7]));
      _mm256_storeu_ps(dst + t + j, _mm256_add_ps(left, right));
    }
  }
}

void signed_apply_avx2(float* out, const float* z, int64_t o, int64_t len, int64_t size, int64_t lane,
                       uint64_t seed, float scale) {
  alignas(32) uint32_t words[4 * (kSignTile + 1)];
  const __m256 s = _mm256_set1_ps(scale);
  const __m256i order = _mm256_xor_si256(lanes(), splat(uint32_t(lane & 7)));
  const auto one = [&](int64_t g0, int64_t j) {
    out[j] = out[j] + signed_one(words, g0, o + j, z[((o + j) & (size - 1)) ^ lane]) * scale;
  };
  for (int64_t t = 0; t < len; t += 128 * kSignTile) {
    const int64_t n = min64(len - t, 128 * kSignTile), g0 = (o + t) >> 7;
    sign_words_avx2(seed, g0, ((o + t + n - 1) >> 7) - g0 + 1, words);
    int64_t j = t;
    if (size < 8) {  // lanes cross no vector: one element at a time
      for (; j < t + n; j++) one(g0, j);
      continue;
    }
    for (; j < t + n && ((o + j) & 7); j++) one(g0, j);
    for (; j + 8 <= t + n; j += 8) {
      const __m256 zs = _mm256_loadu_ps(z + (((o + j) & (size - 1)) ^ (lane & ~int64_t(7))));
      const __m256 v = _mm256_xor_ps(_mm256_permutevar8x32_ps(zs, order), sign_mask(words, g0, o + j));
      _mm256_storeu_ps(out + j, _mm256_add_ps(_mm256_loadu_ps(out + j), _mm256_mul_ps(v, s)));
    }
    for (; j < t + n; j++) one(g0, j);
  }
}

// Within a group of 128 elements each level of the tree halves the vectors: hadd gives
// (a0+a1, b0+b1, a2+a3, b2+b3) and the permute puts the sums back in index order. The chunk's
// group sums then go through the rest of the tree.
double sum_squares_chunk_avx2(const float* x, int64_t n) {
  constexpr int64_t kGroups = kChunk / 128;
  alignas(32) double sums[kGroups];
  alignas(32) float tail[128];
  int64_t groups = 1;  // the smallest aligned subtree of groups holding x: the rest adds zeros
  while (groups * 128 < n) groups *= 2;
  for (int64_t g = 0; g < groups; g++) {
    const int64_t lo = g * 128;
    if (lo >= n) {
      sums[g] = 0.0;
      continue;
    }
    const float* p = x + lo;
    if (n - lo < 128) {
      for (int64_t i = 0; i < 128; i++) tail[i] = lo + i < n ? p[i] : 0.0f;
      p = tail;
    }
    __m256d level[32];
    for (int v = 0; v < 32; v++) {
      const __m256d d = _mm256_cvtps_pd(_mm_loadu_ps(p + 4 * v));
      level[v] = _mm256_mul_pd(d, d);
    }
    for (int width = 16; width >= 1; width /= 2)
      for (int i = 0; i < width; i++)
        level[i] = _mm256_permute4x64_pd(_mm256_hadd_pd(level[2 * i], level[2 * i + 1]), 0xD8);
    alignas(32) double last[4];
    _mm256_store_pd(last, level[0]);
    sums[g] = (last[0] + last[1]) + (last[2] + last[3]);
  }
  for (int64_t width = groups / 2; width >= 1; width /= 2)
    for (int64_t i = 0; i < width; i++) sums[i] = sums[2 * i] + sums[2 * i + 1];
  return sums[0];
}

}  // namespace ferret::detail
