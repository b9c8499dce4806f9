// Portable loops: plain C++, any CPU. The Rademacher reconstruction is bit-identical to the AVX2
// build's (same fp32 operations in the same order); the Gaussian loops live here for both.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "convert.hpp"
#include "kernels.hpp"
#include "philox.hpp"
#include "tree.hpp"

namespace ferret::detail {

void fill_tile(float* tile, const void* x, DType dt, int64_t start, int64_t lo, int64_t hi, int64_t t0) {
  const int64_t a = std::max(lo, t0), b = std::min(hi, t0 + kTile);
  std::fill(tile, tile + kTile, 0.0f);
  if (dt == DType::f32) {
    const float* xf = static_cast<const float*>(x);
    std::copy(xf + (a - start), xf + (b - start), tile + (a - t0));
    return;
  }
  for (int64_t i = a; i < b; i++) tile[i - t0] = load_element(x, dt, i - start);
}

namespace {

// Basis k over the tile starting at block index t0, as fp32 values: ±1 or N(0, 1).
void rademacher_tile(uint64_t seed, int k, int64_t t0, float* v) {
  uint32_t words[4];
  for (int64_t g = 0; g < kTile / 128; g++) {
    basis_words(seed, uint32_t(k), uint32_t((t0 >> 7) + g), words);
    for (int64_t e = 0; e < 128; e++) v[g * 128 + e] = (words[e >> 5] >> (e & 31)) & 1u ? -1.0f : 1.0f;
  }
}

// Triton's uint_to_uniform_float and pair_uniform_to_normal, in fp32.
inline float uniform(uint32_t w) {
  int32_t x;
  std::memcpy(&x, &w, 4);
  if (x < 0) x = ~x;
  return float(x) * 4.6566127342e-10f;
}

void gaussian_tile(uint64_t seed, int k, int64_t t0, float* v) {
  for (int64_t q = 0; q < kTile / 4; q++) {
    uint32_t w[4] = {uint32_t((t0 >> 2) + q), uint32_t(k), 0, 0};
    philox(w, uint32_t(seed), uint32_t(seed >> 32));
    for (int p = 0; p < 2; p++) {
      const float u1 = std::max(1.0e-7f, uniform(w[2 * p]));
      const float th = 6.283185307179586f * uniform(w[2 * p + 1]);
      const float r = std::sqrt(-2.0f * std::log(u1));
      v[4 * q + 2 * p] = r * std::cos(th);
      v[4 * q + 2 * p + 1] = r * std::sin(th);
    }
  }
}

using TileBasis = void (*)(uint64_t, int, int64_t, float*);

// The spec's fp32 sum of one group's 128 signed elements (see python/ferret/spec.py).
float group_sum(const float* e, const uint32_t words[4]) {
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int q = 0; q < 4; q++) {
    uint32_t bits[32];
    std::memcpy(bits, e + 32 * q, sizeof(bits));
    for (int j = 0; j < 32; j++) bits[j] ^= ((words[q] >> j) & 1u) << 31;
    float y[32];
    std::memcpy(y, bits, sizeof(y));
    for (int m = 0; m < 11; m++) {
      const float t = m < 10 ? (y[3 * m] + y[3 * m + 1]) + y[3 * m + 2] : y[30] + y[31];
      acc[m & 3] = acc[m & 3] + t;
    }
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

void rademacher_compress(const void* x, DType dt, int64_t start, int64_t lo, int64_t hi, uint64_t seed,
                         int n_coords, double* partial) {
  std::vector<float> tile(kTile);
  std::vector<double> sums(n_coords);
  PairwiseTree tree(n_coords);
  for (int64_t t0 = lo / kTile * kTile; t0 < hi; t0 += kTile) {
    fill_tile(tile.data(), x, dt, start, lo, hi, t0);
    for (int64_t g = 0; g < kTile / 128; g++) {
      const uint32_t group = uint32_t((t0 >> 7) + g);
      for (int k = 0; k < n_coords; k++) {
        uint32_t words[4];
        basis_words(seed, uint32_t(k), group, words);
        sums[k] = group_sum(tile.data() + g * 128, words);
      }
      tree.add(group, sums.data());
    }
  }
  tree.root(partial);
}

template <TileBasis basis>
void compress_chunk(const void* x, DType dt, int64_t start, int64_t lo, int64_t hi, uint64_t seed, int n_coords,
                    double* partial) {
  std::vector<float> tile(kTile), v(kTile);
  std::fill(partial, partial + n_coords, 0.0);
  for (int64_t t0 = lo / kTile * kTile; t0 < hi; t0 += kTile) {
    fill_tile(tile.data(), x, dt, start, lo, hi, t0);
    for (int k = 0; k < n_coords; k++) {
      basis(seed, k, t0, v.data());
      float acc = 0.0f;
      for (int64_t i = 0; i < kTile; i++) acc += tile[i] * v[i];
      partial[k] += acc;
    }
  }
}

// acc[i] = acc[i] + v_k[i] * gamma[k] in k order (for ±1 the product is exact: ±gamma[k]).
template <TileBasis basis>
void reconstruct_chunk(void* out, DType dt, int64_t start, int64_t lo, int64_t hi, uint64_t seed,
                       const float* gamma, int n_coords, float scale) {
  std::vector<float> acc(kTile), v(kTile);
  for (int64_t t0 = lo / kTile * kTile; t0 < hi; t0 += kTile) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int k = 0; k < n_coords; k++) {
      basis(seed, k, t0, v.data());
      for (int64_t i = 0; i < kTile; i++) acc[i] += v[i] * gamma[k];
    }
    const int64_t a = std::max(lo, t0), b = std::min(hi, t0 + kTile);
    apply_update(out, dt, a - start, acc.data() + (a - t0), b - a, scale);
  }
}

}  // namespace

const ChunkKernels kRademacherPortable = {rademacher_compress, reconstruct_chunk<rademacher_tile>};
const ChunkKernels kGaussian = {compress_chunk<gaussian_tile>, reconstruct_chunk<gaussian_tile>};

}  // namespace ferret::detail

namespace ferret::detail {

void flip_by_bits_portable(float* x, int len, uint32_t w) {
  uint32_t bits[32];
  std::memcpy(bits, x, size_t(len) * 4);
  for (int e = 0; e < len; e++) bits[e] ^= ((w >> e) & 1u) << 31;
  std::memcpy(x, bits, size_t(len) * 4);
}

void fwht_portable(float* x, int64_t n) {
  for (int64_t h = 1; h < n; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; j++) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
}

void sign_words_portable(uint64_t seed, int64_t g0, int64_t n_groups, uint32_t* words) {
  for (int64_t g = 0; g < n_groups; g++) basis_words(seed, 0, uint32_t(g0 + g), words + 4 * g);
}

namespace {

constexpr int64_t kSignTile = 128;  // sign groups per pass of the dense loops (16384 elements)

// x with its sign bit flipped where bit i & 31 of the group's word q = (i >> 5) & 3 is set.
inline float signed_at(const uint32_t* words, int64_t g0, int64_t i, float x) {
  const uint32_t w = words[4 * ((i >> 7) - g0) + ((i >> 5) & 3)];
  return float_of(bits_of(x) ^ (((w >> (i & 31)) & 1u) << 31));
}

}  // namespace

void signed_fold8_portable(float* dst, const float* const* src, const int64_t* offsets, const int64_t* masks,
                           int64_t len, uint64_t seed, const float* const*) {
  std::vector<uint32_t> words(size_t(8 * 4 * kSignTile));
  for (int64_t t = 0; t < len; t += 128 * kSignTile) {
    const int64_t n = std::min(len - t, 128 * kSignTile);
    int64_t from[8];  // where each chunk's source tile starts: the mask's high bits move whole tiles
    for (int c = 0; c < 8; c++) {
      from[c] = t ^ (masks[c] & ~(n - 1));
      if (src[c]) sign_words_portable(seed, (offsets[c] + from[c]) >> 7, n / 128, words.data() + 4 * kSignTile * c);
    }
    for (int64_t j = 0; j < n; j++) {
      float s[8];
      for (int c = 0; c < 8; c++) {
        const int64_t p = from[c] + (j ^ (masks[c] & (n - 1)));
        s[c] = src[c] ? signed_at(words.data() + 4 * kSignTile * c, (offsets[c] + from[c]) >> 7, offsets[c] + p,
                                  src[c][p])
                      : 0.0f;
      }
      dst[t + j] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    }
  }
}

void signed_apply_portable(float* out, const float* z, int64_t o, int64_t len, int64_t size, int64_t lane,
                           uint64_t seed, float scale) {
  uint32_t words[4 * (kSignTile + 1)];
  for (int64_t t = 0; t < len; t += 128 * kSignTile) {
    const int64_t n = std::min(len - t, 128 * kSignTile), g0 = (o + t) >> 7;
    sign_words_portable(seed, g0, ((o + t + n - 1) >> 7) - g0 + 1, words);
    for (int64_t j = t; j < t + n; j++)
      out[j] = out[j] + signed_at(words, g0, o + j, z[((o + j) & (size - 1)) ^ lane]) * scale;
  }
}

double sum_squares_chunk_portable(const float* x, int64_t n) {
  int64_t span = 1;  // the smallest aligned subtree holding x: the rest of the chunk's tree adds zeros
  while (span < n) span *= 2;
  std::vector<double> level(size_t(span), 0.0);
  for (int64_t i = 0; i < n; i++) level[size_t(i)] = double(x[i]) * double(x[i]);
  for (int64_t width = span / 2; width >= 1; width /= 2)
    for (int64_t i = 0; i < width; i++) level[size_t(i)] = level[size_t(2 * i)] + level[size_t(2 * i + 1)];
  return level[0];
}

}  // namespace ferret::detail
