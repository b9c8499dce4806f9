// ferret_core: seeded random projections of parameter updates, on the CPU.
//
// The C++17 core behind ferret's compress / reconstruct / perturb. It knows nothing of Python,
// torch or federated learning: it takes raw buffers of fp32, bf16 or fp16 elements that sit at
// positions [start, start + n) of a block, and a 63-bit block seed. The basis spec it implements
// is written out in python/ferret/spec.py (the executable reference); in short:
//
//   Rademacher basis k, element i:  w = Philox4x32-10(key=seed, ctr=(i>>7, k, 0, 0))[(i>>5)&3]
//                                   v_k[i] = (w >> (i&31)) & 1 ? -1 : +1
//   Gaussian basis k, element i:    Box-Muller on Philox(key=seed, ctr=(i>>2, k, 0, 0)), as
//                                   Triton's tl.randn4x(seed, (k<<32) | (i>>2))[i&3]
//
//   SRHT (Hadamard size B = 2^p):    chunks of B elements, then the binary digits of n mod B;
//                                   coordinate k = row r_k of fwht(d * x) over r_k's chunk, with
//                                   d = Rademacher basis 0 and r = a seeded Fisher-Yates
//                                   permutation of [0, n) (counter (t, t>>32, kSrhtRowDomain, 0))
//   Dense Hadamard (size B = 2^p):   v_k[i] = d_i * H[r_k, i mod B]; coordinates = rows of
//                                   fwht(fold), fold[j] = sum over chunks c of d * x at cB + j
//                                   (fp32 pairwise tree over c); slot c of F takes rows P[c + F k]
//                                   of the permutation of [0, B)
//
// Results never depend on the number of threads: work is cut into fixed chunks of the block's
// index space, and every reduction adds fp64 partials in the spec's fixed pairwise-tree order.
#pragma once

#include <cstdint>

namespace ferret {

enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };
enum class Basis : int { rademacher = 0, gaussian = 1 };

struct Words4 {
  uint32_t w[4];
};

// One Philox4x32-10 evaluation (Random123's philox4x32_10, Triton's tl.randint4x convention).
Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1);

// gamma[k] += <x, v_k> for k < n_coords, where x[j] is element start + j of the block (with
// base, <x - base, v_k>: the difference of the two buffers, read window by window).
void compress(const void* x, DType dtype, int64_t n, int64_t start, uint64_t seed, Basis basis,
              int n_coords, double* gamma, const void* base = nullptr);

// out[j] = out[j] + scale * sum_k gamma[k] * v_k[start + j], in fp32, k in order (see spec.py).
void reconstruct(void* out, DType dtype, int64_t n, int64_t start, uint64_t seed, Basis basis,
                 const float* gamma, int n_coords, float scale);

// theta[j] = theta[j] + eps * v_0[start + j]: the zeroth-order perturbation z(seed).
void perturb(void* theta, DType dtype, int64_t n, int64_t start, uint64_t seed, Basis basis, float eps);

// One contiguous piece of a block: n elements of dtype sitting at block indices [start, start + n).
struct Segment {
  void* data;
  DType dtype;
  int64_t n;
  int64_t start;
  const void* base = nullptr;  // when set, a compress reads data - base (same dtype and size), never written
};

constexpr uint32_t kSrhtRowDomain = 0x5247A4D5u;
constexpr uint32_t kDenseLaneDomain = 0x4C414E45u;  // counter word 2 of a dense chunk's lane mask

// rows[k] for k < m: the first m rows of the block's seeded permutation of [0, n); needs m <= n.
void srht_rows(uint64_t seed, int64_t n, int64_t m, int64_t* rows);

// coords[k] = row r_k (srht_rows) of the SRHT of a block of block_n elements, Hadamard size 2^log2_size,
// read from segments that together cover [0, block_n) exactly once. Only chunks holding a row are read.
// Throws std::invalid_argument for m > block_n or a Hadamard size outside 2^1 .. 2^15.
void srht_compress(const Segment* segments, int n_segments, int64_t block_n, uint64_t seed, int log2_size,
                   int64_t m, float* coords);

// out = out + (d * fwht(coords scattered at their rows)) * (scale / chunk size), per chunk holding
// a row, on the segments in place (see spec.py). scale is alpha * block_n / m in fp32.
void srht_reconstruct(const Segment* segments, int n_segments, int64_t block_n, uint64_t seed, int log2_size,
                      const float* coords, int64_t m, float scale);

// rows[k] = P[slot + slots * k] for k < m, P the seeded permutation of [0, 2^log2_size) (srht_rows).
void dense_rows(uint64_t seed, int log2_size, int64_t slot, int64_t slots, int64_t m, int64_t* rows);

// coords[k] = row r_k (dense_rows) of fwht(fold) for the dense Hadamard basis of size 2^log2_size,
// the fold (element j of chunk c on lane j ^ s_c) over segments of one block (any part of it;
// the rest counts as 0). Throws
// std::invalid_argument for a size outside 2^0 .. 2^22, a bad slot, or more rows than the slot holds.
void dense_compress(const Segment* segments, int n_segments, uint64_t seed, int log2_size, int64_t slot,
                    int64_t slots, int64_t m, float* coords);

// One block's dense_compress job. With `squares` (one per segment), dense_fold_many also writes
// each segment's sum of squares (sum_squares' value) from the same read of the update.
struct DenseBlock {
  const Segment* segments;
  int n_segments;
  uint64_t seed;
  int log2_size;
  int64_t slot, slots, m;
  float* coords;
  double* squares = nullptr;
};

// dense_compress for every block at once: all blocks' pieces share the thread pool (a model of
// many small tensors no longer wakes it per tensor). Same results; checks every block first.
void dense_compress_many(const DenseBlock* blocks, int n_blocks);

// dense_compress_many in two steps, so the coordinates per block (m) may be chosen from the
// norms between them: folds[b] (2^log2_size floats) = block b's fold, and its segments' sums of
// squares where `squares` is set (each such segment must start on a chunk: std::invalid_argument
// otherwise); then each fold transformed in place and its first m rows of the slot read into
// coords.
void dense_fold_many(const DenseBlock* blocks, int n_blocks, float* const* folds);
void dense_pick_many(const DenseBlock* blocks, int n_blocks, float* const* folds);

// In place: out[i] = out[i] + (d_i * z[(i mod B) ^ s_c]) * scale on every segment, z = fwht(coords
// scattered at their rows); scale is alpha / m in fp32. Throws as dense_compress does.
void dense_reconstruct(const Segment* segments, int n_segments, uint64_t seed, int log2_size, int64_t slot,
                       int64_t slots, const float* coords, int64_t m, float scale);

// One block's dense_reconstruct job.
struct DenseRebuild {
  const Segment* segments;
  int n_segments;
  uint64_t seed;
  int log2_size;
  int64_t slot, slots;
  const float* coords;
  int64_t m;
  float scale;
  const int64_t* rows = nullptr;  // when set, coordinate k goes to row rows[k] (each below the size), not the slot's
};

// dense_reconstruct for every block at once: the transforms, then every block's windows, each
// on the pool in one go. Same results; checks every block before writing anything.
void dense_reconstruct_many(const DenseRebuild* blocks, int n_blocks);

// Sum of squares of x in fp64, deterministic (chunked like compress).
double sum_squares(const void* x, DType dtype, int64_t n);
// out[t] = sum_squares of tensor t, for t < count: the same values, all tensors' chunks on the
// pool at once (many small tensors no longer wake it once each). With bases, of xs[t] - bases[t]
// (a null base: xs[t] itself).
void sum_squares_many(const void* const* xs, const DType* dtypes, const int64_t* ns, int count, double* out,
                      const void* const* bases = nullptr);

// Threads used by the calls above (default: the hardware's count, or FERRET_NUM_THREADS).
void set_num_threads(int n);
int num_threads();

// The instruction set the hot loops run with: "avx2" (x86-64-v3) or "portable".
const char* simd_level();
// Force the portable loops even where AVX2 is present (tests compare the two); returns the old value.
bool force_portable(bool on);

}  // namespace ferret
