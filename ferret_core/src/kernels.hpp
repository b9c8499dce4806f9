// The per-chunk loops behind the public calls. A chunk is the part of one segment that falls in
// one kChunk-aligned window of the block's index space; tiles are kTile-aligned inside it. Every
// loop sees block indices [lo, hi) and finds element i of the segment at x[i - start].
#pragma once

#include <cstdint>

#include "ferret_core/ferret_core.hpp"

namespace ferret::detail {

constexpr int64_t kChunk = int64_t(1) << 16;
constexpr int64_t kTile = 1024;

struct ChunkKernels {
  // partial[k] = <x restricted to [lo, hi), v_k> for k < n_coords (fp64; partial has n_coords slots);
  // for Rademacher bases in the spec's order: the pairwise-tree root over the chunk's group sums.
  void (*compress)(const void* x, DType dt, int64_t start, int64_t lo, int64_t hi, uint64_t seed,
                   int n_coords, double* partial);
  // out[i - start] += scale * sum_k gamma[k] v_k[i] for i in [lo, hi), spec order.
  void (*reconstruct)(void* out, DType dt, int64_t start, int64_t lo, int64_t hi, uint64_t seed,
                      const float* gamma, int n_coords, float scale);
};

// Rademacher loops: portable C++ everywhere; AVX2+FMA (x86-64-v3) when built with
// FERRET_HAVE_AVX2_BUILD, used only where the CPU has it.
extern const ChunkKernels kRademacherPortable;
extern const ChunkKernels kRademacherAvx2;
// Gaussian loops (scalar; libm's log/cos make them device-specific anyway).
extern const ChunkKernels kGaussian;

// Copies block indices [t0, t0 + kTile) ∩ [lo, hi) of the segment into tile (fp32), zeros elsewhere.
void fill_tile(float* tile, const void* x, DType dt, int64_t start, int64_t lo, int64_t hi, int64_t t0);

}  // namespace ferret::detail

namespace ferret::detail {

// Unnormalised Walsh-Hadamard transform of x[0, n) in place, n a power of two: butterfly stages
// h = 1, 2, 4, .. in that order, (a, b) -> (a + b, a - b) in fp32. Both builds are bit-identical.
void fwht_portable(float* x, int64_t n);
void fwht_avx2(float* x, int64_t n);

// x[e] = -x[e] (sign bit flipped) where bit e of w is set, for e < len <= 32.
void flip_by_bits_portable(float* x, int len, uint32_t w);
void flip_by_bits_avx2(float* x, int len, uint32_t w);

// x[j] *= d_(o + j) for j < size (d = Rademacher basis 0 of the seed): the sign flips of one
// chunk of the Hadamard bases, aligned to its own size or a multiple of 32 long (srht.cpp).
void flip_signs(float* x, int64_t o, int64_t size, uint64_t seed);

// The dense Hadamard basis's loops (d = Rademacher basis 0 of the seed, as in flip_by_bits):
// words[4 g + q] = Philox word q of sign group g0 + g, for g < n_groups.
void sign_words_portable(uint64_t seed, int64_t g0, int64_t n_groups, uint32_t* words);
void sign_words_avx2(uint64_t seed, int64_t g0, int64_t n_groups, uint32_t* words);
// dst[l] = the pairwise tree over c < 8 of d_i * src[c][p] at p = l ^ masks[c], i = offsets[c] + p,
// for l < len, with src[c] null counting as 0 (fp32: ((s0 + s1) + (s2 + s3)) + ((s4 + s5) +
// (s6 + s7))): eight chunks of len elements, each read in its own lane order. offsets and len
// are multiples of 128, len a power of two, masks[c] < len. next[c] (or null): the first 16384
// elements (at most len) the caller reads next, prefetched meanwhile (the AVX2 loop).
void signed_fold8_portable(float* dst, const float* const* src, const int64_t* offsets, const int64_t* masks,
                           int64_t len, uint64_t seed, const float* const* next);
void signed_fold8_avx2(float* dst, const float* const* src, const int64_t* offsets, const int64_t* masks,
                       int64_t len, uint64_t seed, const float* const* next);
// out[j] = out[j] + (d_i * z[(i & (size - 1)) ^ lane]) * scale at i = o + j, for j < len, in fp32
// with two roundings: a piece of one chunk of size elements (a power of two), lane < size.
void signed_apply_portable(float* out, const float* z, int64_t o, int64_t len, int64_t size, int64_t lane,
                           uint64_t seed, float scale);
void signed_apply_avx2(float* out, const float* z, int64_t o, int64_t len, int64_t size, int64_t lane,
                       uint64_t seed, float scale);

// The pairwise tree over the fp64 squares of x[0, n), n <= kChunk, as if zero-padded to kChunk
// elements (squares are never -0, so padding with zeros is the tree with absent nodes).
double sum_squares_chunk_portable(const float* x, int64_t n);
double sum_squares_chunk_avx2(const float* x, int64_t n);

// Whether the AVX2 loops are in use (built, present on this CPU, and not forced off).
bool use_avx2();

}  // namespace ferret::detail
