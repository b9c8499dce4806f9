// The subsampled randomized Hadamard transform of one block (spec: python/ferret/spec.py): the
// chunk rule, the seeded row permutation, and compress / reconstruct over the chunks holding a
// row. Chunks are independent, so threads split them without changing any result.
#include <algorithm>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "convert.hpp"
#include "ferret_core/ferret_core.hpp"
#include "kernels.hpp"
#include "philox.hpp"
#include "thread_pool.hpp"

namespace ferret {
namespace {

struct Chunk {
  int64_t offset, size;
};

// The chunk holding element i of a block of n elements: chunks of `size`, then the binary digits
// of what is left, largest first.
Chunk chunk_at(int64_t i, int64_t n, int64_t size) {
  const int64_t full = n / size * size;
  if (i < full) return {i / size * size, size};
  int64_t at = full;
  for (int64_t piece = size / 2; piece > 0; piece /= 2) {
    if (!((n - full) & piece)) continue;
    if (i < at + piece) return {at, piece};
    at += piece;
  }
  throw std::logic_error("chunk_at: index outside the block");
}

// The chunks that hold a row, each with the coordinates (indices k) whose rows fall in it.
struct Touched {
  Chunk chunk;
  std::vector<int64_t> ks;
};

std::vector<Touched> touched_chunks(const std::vector<int64_t>& rows, int64_t n, int64_t size) {
  std::vector<int64_t> order(rows.size());
  std::iota(order.begin(), order.end(), 0);
  std::vector<int64_t> offsets(rows.size());
  for (size_t k = 0; k < rows.size(); k++) offsets[k] = chunk_at(rows[k], n, size).offset;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return offsets[a] < offsets[b]; });
  std::vector<Touched> out;
  for (int64_t k : order) {
    if (out.empty() || out.back().chunk.offset != offsets[k]) out.push_back({chunk_at(rows[k], n, size), {}});
    out.back().ks.push_back(k);
  }
  return out;
}

void fwht(float* x, int64_t n) {
#ifdef FERRET_HAVE_AVX2_BUILD
  if (detail::use_avx2()) return detail::fwht_avx2(x, n);
#endif
  detail::fwht_portable(x, n);
}

void check(int64_t block_n, int log2_size, int64_t m) {
  if (log2_size < 1 || log2_size > 15)
    throw std::invalid_argument("the SRHT Hadamard size must be 2^1 .. 2^15, got 2^" + std::to_string(log2_size));
  if (m < 0 || m > block_n)
    throw std::invalid_argument("an SRHT block of " + std::to_string(block_n) + " elements has that many rows; " +
                                std::to_string(m) + " were asked for");
}

// Runs fn(touched chunk, scratch of chunk size) on the pool; small jobs stay on this thread.
template <class Fn>
void for_each_chunk(const std::vector<Touched>& chunks, Fn fn) {
  int64_t elements = 0;
  for (const auto& t : chunks) elements += t.chunk.size;
  const int threads = elements < (int64_t(1) << 16) ? 1 : num_threads();
  detail::parallel_for(int64_t(chunks.size()), threads, [&](int64_t c) {
    thread_local std::vector<float> scratch;
    scratch.assign(size_t(chunks[c].chunk.size), 0.0f);
    fn(chunks[c], scratch.data());
  });
}

}  // namespace

void srht_rows(uint64_t seed, int64_t n, int64_t m, int64_t* rows) {
  std::unordered_map<int64_t, int64_t> moved;
  moved.reserve(size_t(2 * m));
  const auto at = [&](int64_t key) {
    const auto it = moved.find(key);
    return it == moved.end() ? key : it->second;
  };
  for (int64_t t = 0; t < m; t++) {
    uint32_t c[4] = {uint32_t(t), uint32_t(uint64_t(t) >> 32), kSrhtRowDomain, 0};
    detail::philox(c, uint32_t(seed), uint32_t(seed >> 32));
    const uint64_t u = uint64_t(c[0]) | (uint64_t(c[1]) << 32);
    const int64_t r = t + int64_t(u % uint64_t(n - t));
    rows[t] = at(r);
    moved[r] = at(t);
  }
}

void srht_compress(const Segment* segments, int n_segments, int64_t block_n, uint64_t seed, int log2_size,
                   int64_t m, float* coords) {
  check(block_n, log2_size, m);
  std::vector<int64_t> rows(static_cast<size_t>(m));
  srht_rows(seed, block_n, m, rows.data());
  for_each_chunk(touched_chunks(rows, block_n, int64_t(1) << log2_size), [&](const Touched& t, float* buf) {
    const int64_t o = t.chunk.offset, end = o + t.chunk.size;
    for (int s = 0; s < n_segments; s++) {
      const Segment& seg = segments[s];
      const int64_t lo = std::max(o, seg.start), hi = std::min(end, seg.start + seg.n);
      if (lo < hi) detail::read_elements(buf + (lo - o), seg.data, seg.base, seg.dtype, lo - seg.start, hi - lo);
    }
    detail::flip_signs(buf, o, t.chunk.size, seed);
    fwht(buf, t.chunk.size);
    for (int64_t k : t.ks) coords[k] = buf[rows[size_t(k)] - o];
  });
}

void srht_reconstruct(const Segment* segments, int n_segments, int64_t block_n, uint64_t seed, int log2_size,
                      const float* coords, int64_t m, float scale) {
  check(block_n, log2_size, m);
  std::vector<int64_t> rows(static_cast<size_t>(m));
  srht_rows(seed, block_n, m, rows.data());
  for_each_chunk(touched_chunks(rows, block_n, int64_t(1) << log2_size), [&](const Touched& t, float* buf) {
    const int64_t o = t.chunk.offset, end = o + t.chunk.size;
    for (int64_t k : t.ks) buf[rows[size_t(k)] - o] = coords[k];
    fwht(buf, t.chunk.size);
    detail::flip_signs(buf, o, t.chunk.size, seed);
    const float factor = scale * (1.0f / float(t.chunk.size));  // exact: a power of two
    for (int s = 0; s < n_segments; s++) {
      const Segment& seg = segments[s];
      const int64_t lo = std::max(o, seg.start), hi = std::min(end, seg.start + seg.n);
      if (lo < hi) detail::apply_update(seg.data, seg.dtype, lo - seg.start, buf + (lo - o), hi - lo, factor);
    }
  });
}

namespace detail {

// x[j] *= d_{o + j}: flips the sign bit where Rademacher basis 0 has -1. A chunk is aligned to
// its own size, so one of 32 or more starts a sign word and a smaller one sits inside one.
void flip_signs(float* x, int64_t o, int64_t size, uint64_t seed) {
  uint32_t words[4];
  int64_t group = -1;
  for (int64_t j0 = 0; j0 < size; j0 += 32) {
    const int64_t i0 = o + j0;
    if ((i0 >> 7) != group) {
      group = i0 >> 7;
      detail::basis_words(seed, 0, uint32_t(group), words);
    }
    const uint32_t w = words[(i0 >> 5) & 3] >> (i0 & 31);
    const int len = int(std::min<int64_t>(32, size - j0));
#ifdef FERRET_HAVE_AVX2_BUILD
    if (detail::use_avx2()) {
      detail::flip_by_bits_avx2(x + j0, len, w);
      continue;
    }
#endif
    detail::flip_by_bits_portable(x + j0, len, w);
  }
}

}  // namespace detail

}  // namespace ferret
