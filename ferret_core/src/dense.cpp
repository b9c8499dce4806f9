// The dense randomized Hadamard basis of one block (spec: python/ferret/spec.py): every basis is
// a Hadamard row repeated over the block's chunks of B elements, each chunk with its own signs and
// its own lane order (element j of chunk c sits at lane j ^ s_c).
// Compress folds the signed chunks into B sums (the pairwise tree over the chunk index, fp32),
// transforms once and picks the slot's rows; reconstruct transforms the scattered coordinates
// once and adds the signed result to every chunk. Threads take aligned pieces of the tree
// (compress) or aligned windows of the block (reconstruct), so no result depends on their count.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "convert.hpp"
#include "ferret_core/ferret_core.hpp"
#include "kernels.hpp"
#include "philox.hpp"
#include "thread_pool.hpp"
#include "tree.hpp"

namespace ferret {
namespace {

constexpr int64_t kTask = int64_t(1) << 16;  // elements per reconstruct task; compress tasks read more

void check(int log2_size, int64_t slot, int64_t slots, int64_t m) {
  if (log2_size < 0 || log2_size > 22)
    throw std::invalid_argument("the Hadamard size must be 2^0 .. 2^22, got 2^" + std::to_string(log2_size));
  const int64_t size = int64_t(1) << log2_size;
  if (slots < 1 || slot < 0 || slot >= slots)
    throw std::invalid_argument("slot " + std::to_string(slot) + " is not one of 0 .. " + std::to_string(slots - 1));
  const int64_t rows = std::max<int64_t>(0, (size - slot + slots - 1) / slots);
  if (m < 0 || m > rows)
    throw std::invalid_argument("slot " + std::to_string(slot) + " of " + std::to_string(slots) + " holds " +
                                std::to_string(rows) + " rows of a Hadamard size of " + std::to_string(size) + "; " +
                                std::to_string(m) + " were asked for");
}

// The lane mask s_c of chunk c: word 0 of Philox(key=seed, ctr=(c, c >> 32, kDenseLaneDomain, 0)).
int64_t lane_mask(uint64_t seed, int64_t c, int64_t size) {
  uint32_t w[4] = {uint32_t(c), uint32_t(uint64_t(c) >> 32), kDenseLaneDomain, 0};
  detail::philox(w, uint32_t(seed), uint32_t(seed >> 32));
  return int64_t(w[0]) & (size - 1);
}

void signed_fold8(float* dst, const float* const* src, const int64_t* offsets, const int64_t* lanes, int64_t len,
                  uint64_t seed, const float* const* next) {
#ifdef FERRET_HAVE_AVX2_BUILD
  if (detail::use_avx2()) return detail::signed_fold8_avx2(dst, src, offsets, lanes, len, seed, next);
#endif
  detail::signed_fold8_portable(dst, src, offsets, lanes, len, seed, next);
}

void signed_apply(float* out, const float* z, int64_t o, int64_t len, int64_t size, int64_t lane, uint64_t seed,
                  float scale) {
#ifdef FERRET_HAVE_AVX2_BUILD
  if (detail::use_avx2()) return detail::signed_apply_avx2(out, z, o, len, size, lane, seed, scale);
#endif
  detail::signed_apply_portable(out, z, o, len, size, lane, seed, scale);
}

// Block indices [lo, hi) of a segment, inside one chunk of lane mask `lane`, += (d * z[lane of i]) * scale.
void add_signed(const Segment& seg, int64_t lo, int64_t hi, const float* z, int64_t size, int64_t lane,
                uint64_t seed, float scale) {
  if (seg.dtype == DType::f32) {
    signed_apply(static_cast<float*>(seg.data) + (lo - seg.start), z, lo, hi - lo, size, lane, seed, scale);
    return;
  }
  float buf[1024];
  for (int64_t a = lo; a < hi; a += 1024) {
    const int64_t n = std::min<int64_t>(1024, hi - a);
    for (int64_t j = 0; j < n; j++) buf[j] = 0.0f;
    signed_apply(buf, z, a, n, size, lane, seed, 1.0f);  // d * z exactly: 0 + (d z) * 1
    detail::apply_update(seg.data, seg.dtype, a - seg.start, buf, n, scale);
  }
}

void fwht(float* x, int64_t n) {
#ifdef FERRET_HAVE_AVX2_BUILD
  if (detail::use_avx2()) return detail::fwht_avx2(x, n);
#endif
  detail::fwht_portable(x, n);
}

double squares_upto_chunk(const float* x, int64_t n) {
#ifdef FERRET_HAVE_AVX2_BUILD
  if (detail::use_avx2()) return detail::sum_squares_chunk_avx2(x, n);
#endif
  return detail::sum_squares_chunk_portable(x, n);
}

// The pairwise tree over the fp64 squares of a chunk's `size` elements (in element order).
double chunk_squares(const float* x, int64_t size) {
  if (size <= detail::kChunk) return squares_upto_chunk(x, size);
  detail::PairwiseTree tree(1);
  for (int64_t a = 0; a < size; a += detail::kChunk) {
    const double part = squares_upto_chunk(x + a, detail::kChunk);
    tree.add(a / detail::kChunk, &part);
  }
  double total = 0.0;
  tree.root(&total);
  return total;
}

// buf[j] = element o + j of the block where the segment holds it, else 0, for j < len.
void read_window(float* buf, const Segment& seg, int64_t o, int64_t len) {
  const int64_t lo = std::max(o, seg.start), hi = std::max(lo, std::min(o + len, seg.start + seg.n));
  std::fill(buf, buf + (lo - o), 0.0f);
  std::fill(buf + (hi - o), buf + len, 0.0f);
  if (lo == hi) return;
  detail::read_elements(buf + (lo - o), seg.data, seg.base, seg.dtype, lo - seg.start, hi - lo);
}

// Chunk c of the block in place, when the segment holds all of it in fp32 (and no base); else null.
const float* chunk_of(const Segment& seg, int64_t c, int64_t size) {
  const int64_t o = c * size;
  if (seg.dtype == DType::f32 && !seg.base && o >= seg.start && o + size <= seg.start + seg.n)
    return static_cast<const float*>(seg.data) + (o - seg.start);
  return nullptr;
}

// The tree over chunks first..last of one segment, from level 3 up: eight signed chunks are
// added in one pass (chunks of 128 elements or more), then go into the tree at index c / 8.
// With `squares`, the chunks' sums of squares go into it the same way, read while in cache.
void fold_eights(detail::PairwiseTreeOf<float>& tree, detail::PairwiseTree* squares, const Segment& seg,
                 uint64_t seed, int64_t size, int64_t first, int64_t last, std::vector<float>& bufs) {
  const int64_t tile = std::min<int64_t>(size, 16384);  // the AVX2 loop's tile: where it reads first
  const auto in_place = [&](int64_t eight, const float** src, int64_t* offsets, int64_t* lanes) {
    for (int k = 0; k < 8; k++) {
      const int64_t c = 8 * eight + k;
      offsets[k] = c * size;
      lanes[k] = lane_mask(seed, c, size);
      src[k] = c < first || c > last ? nullptr : chunk_of(seg, c, size);
    }
  };
  const float* src[8];
  int64_t offsets[8], lanes[8];
  in_place(first >> 3, src, offsets, lanes);
  for (int64_t eight = first >> 3; eight <= last >> 3; eight++) {
    const float* next[8] = {};
    const float* next_src[8];
    int64_t next_offsets[8], next_lanes[8];
    if (eight < last >> 3) {
      in_place(eight + 1, next_src, next_offsets, next_lanes);
      for (int k = 0; k < 8; k++)
        if (next_src[k]) next[k] = next_src[k] + (next_lanes[k] & ~(tile - 1));
    }
    bool any = false;
    for (int k = 0; k < 8; k++) {
      const int64_t c = 8 * eight + k;
      if (c < first || c > last) continue;
      if (!src[k]) {  // the chunk must be read into fp32 first
        if (bufs.empty()) bufs.resize(size_t(8 * size));
        read_window(bufs.data() + k * size, seg, c * size, size);
        src[k] = bufs.data() + k * size;
      }
      any = true;
    }
    if (any) {
      signed_fold8(tree.leaf(), src, offsets, lanes, size, seed, next);
      tree.add_leaf(eight);
      if (squares) {  // the node at level 3: ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
        double s8[8];
        for (int k = 0; k < 8; k++) {
          const int64_t c = 8 * eight + k;
          s8[k] = c < first || c > last ? 0.0 : chunk_squares(src[k], size);
        }
        const double node = ((s8[0] + s8[1]) + (s8[2] + s8[3])) + ((s8[4] + s8[5]) + (s8[6] + s8[7]));
        squares->add(eight, &node);
      }
    }
    if (eight < last >> 3) {
      std::copy(next_src, next_src + 8, src);
      std::copy(next_offsets, next_offsets + 8, offsets);
      std::copy(next_lanes, next_lanes + 8, lanes);
    }
  }
}

// The tree over chunks first..last of one segment (an aligned subtree): its root into `root`,
// and with `squares` the root of the same tree over the chunks' sums of squares into it.
void piece_root(const Segment& seg, uint64_t seed, int64_t size, int64_t first, int64_t last, float* root,
                double* squares) {
  detail::PairwiseTreeOf<float> tree(size);
  detail::PairwiseTree square_tree(1);
  detail::PairwiseTree* sq = squares ? &square_tree : nullptr;
  if (size >= 128) {
    std::vector<float> bufs;
    fold_eights(tree, sq, seg, seed, size, first, last, bufs);
  } else {
    float chunk[128];
    for (int64_t c = first; c <= last; c++) {
      read_window(chunk, seg, c * size, size);
      if (sq) {
        const double node = chunk_squares(chunk, size);
        sq->add(c, &node);
      }
      detail::flip_signs(chunk, c * size, size, seed);
      const int64_t lane = lane_mask(seed, c, size);
      float* leaf = tree.leaf();
      for (int64_t l = 0; l < size; l++) leaf[l] = chunk[l ^ lane];
      tree.add_leaf(c);
    }
  }
  tree.root(root);
  if (sq) sq->root(squares);
}

// One aligned piece of a segment's chunk tree: chunks first..last, at index `index` of its level.
struct Piece {
  int block, segment;
  int64_t first, last, index;
  std::vector<float> root;
  double squares = 0.0;
};

// The pieces of one segment: a small one is one piece; a large one is cut into at most 4 per
// thread, aligned subtrees of 2^level chunks (2^3 or more when eight chunks fold at once).
void plan_pieces(const Segment& seg, int64_t size, int block, int segment, std::vector<Piece>& pieces) {
  if (seg.n == 0) return;
  const int64_t c0 = seg.start / size, c1 = (seg.start + seg.n - 1) / size;
  const int threads = seg.n < 2 * kTask ? 1 : num_threads();
  int level = size >= 128 ? 3 : 0;
  while ((c1 >> level) - (c0 >> level) + 1 > 4 * threads) level++;
  for (int64_t p = c0 >> level; p <= c1 >> level; p++)
    pieces.push_back({block, segment, std::max(c0, p << level), std::min(c1, ((p + 1) << level) - 1), p, {}, 0.0});
}

std::vector<int64_t> rows_of(uint64_t seed, int64_t size, int64_t slot, int64_t slots, int64_t m) {
  std::vector<int64_t> rows(static_cast<size_t>(m));
  if (m == 0) return rows;
  std::vector<int64_t> all(static_cast<size_t>(slot + slots * (m - 1) + 1));
  srht_rows(seed, size, int64_t(all.size()), all.data());
  for (int64_t k = 0; k < m; k++) rows[size_t(k)] = all[size_t(slot + slots * k)];
  return rows;
}

}  // namespace

void dense_rows(uint64_t seed, int log2_size, int64_t slot, int64_t slots, int64_t m, int64_t* rows) {
  check(log2_size, slot, slots, m);
  const auto r = rows_of(seed, int64_t(1) << log2_size, slot, slots, m);
  std::copy(r.begin(), r.end(), rows);
}

void dense_compress(const Segment* segments, int n_segments, uint64_t seed, int log2_size, int64_t slot,
                    int64_t slots, int64_t m, float* coords) {
  const DenseBlock block{segments, n_segments, seed, log2_size, slot, slots, m, coords};
  dense_compress_many(&block, 1);
}

void dense_fold_many(const DenseBlock* blocks, int n_blocks, float* const* folds) {
  for (int b = 0; b < n_blocks; b++) {
    check(blocks[b].log2_size, blocks[b].slot, blocks[b].slots, 0);
    if (!blocks[b].squares) continue;
    const int64_t size = int64_t(1) << blocks[b].log2_size;
    for (int s = 0; s < blocks[b].n_segments; s++)
      if (blocks[b].segments[s].start % size)
        throw std::invalid_argument("a segment's sum of squares comes with its fold only when it starts on a chunk "
                                    "(start " + std::to_string(blocks[b].segments[s].start) + ", Hadamard size " +
                                    std::to_string(size) + ")");
  }
  // Every piece of every block's tree on the pool at once (small blocks one piece each), then
  // each block's pieces combined: the same trees, whatever the cut.
  std::vector<Piece> pieces;
  std::vector<size_t> first_piece(size_t(n_blocks) + 1);  // block b's pieces: first_piece[b] ..
  int64_t elements = 0;
  for (int b = 0; b < n_blocks; b++) {
    first_piece[size_t(b)] = pieces.size();
    for (int s = 0; s < blocks[b].n_segments; s++) {
      plan_pieces(blocks[b].segments[s], int64_t(1) << blocks[b].log2_size, b, s, pieces);
      elements += blocks[b].segments[s].n;
      if (blocks[b].squares) blocks[b].squares[s] = 0.0;
    }
  }
  first_piece[size_t(n_blocks)] = pieces.size();
  const int threads = elements < 2 * kTask ? 1 : num_threads();
  detail::parallel_for(int64_t(pieces.size()), threads, [&](int64_t i) {
    Piece& p = pieces[size_t(i)];
    const DenseBlock& block = blocks[p.block];
    const int64_t size = int64_t(1) << block.log2_size;
    p.root.resize(size_t(size));
    piece_root(block.segments[p.segment], block.seed, size, p.first, p.last, p.root.data(),
               block.squares ? &p.squares : nullptr);
  });
  detail::parallel_for(n_blocks, n_blocks > 1 ? threads : 1, [&](int64_t b) {
    const DenseBlock& block = blocks[b];
    const int64_t size = int64_t(1) << block.log2_size;
    float* y = folds[b];
    std::fill(y, y + size, 0.0f);
    std::vector<float> fold(static_cast<size_t>(size));
    for (size_t i = first_piece[size_t(b)]; i < first_piece[size_t(b) + 1];) {
      const int s = pieces[i].segment;  // y = y + the tree over this segment's pieces
      detail::PairwiseTreeOf<float> tree(size);
      detail::PairwiseTree squares(1);
      for (; i < first_piece[size_t(b) + 1] && pieces[i].segment == s; i++) {
        tree.add(pieces[i].index, pieces[i].root.data());
        squares.add(pieces[i].index, &pieces[i].squares);
        std::vector<float>().swap(pieces[i].root);
      }
      tree.root(fold.data());
      if (block.squares) squares.root(&block.squares[s]);
      for (int64_t j = 0; j < size; j++) y[j] = y[j] + fold[size_t(j)];
    }
  });
}

void dense_pick_many(const DenseBlock* blocks, int n_blocks, float* const* folds) {
  int64_t elements = 0;
  for (int b = 0; b < n_blocks; b++) {
    check(blocks[b].log2_size, blocks[b].slot, blocks[b].slots, blocks[b].m);
    elements += int64_t(1) << blocks[b].log2_size;
  }
  detail::parallel_for(n_blocks, n_blocks > 1 && elements >= 2 * kTask ? num_threads() : 1, [&](int64_t b) {
    const DenseBlock& block = blocks[b];
    const int64_t size = int64_t(1) << block.log2_size;
    fwht(folds[b], size);
    const auto rows = rows_of(block.seed, size, block.slot, block.slots, block.m);
    for (int64_t k = 0; k < block.m; k++) block.coords[k] = folds[b][rows[size_t(k)]];
  });
}

void dense_compress_many(const DenseBlock* blocks, int n_blocks) {
  for (int b = 0; b < n_blocks; b++) check(blocks[b].log2_size, blocks[b].slot, blocks[b].slots, blocks[b].m);
  std::vector<std::vector<float>> ys(static_cast<size_t>(n_blocks));
  std::vector<float*> folds(static_cast<size_t>(n_blocks));
  for (int b = 0; b < n_blocks; b++) {
    ys[size_t(b)].resize(size_t(int64_t(1) << blocks[b].log2_size));
    folds[size_t(b)] = ys[size_t(b)].data();
  }
  dense_fold_many(blocks, n_blocks, folds.data());
  dense_pick_many(blocks, n_blocks, folds.data());
}

void dense_reconstruct(const Segment* segments, int n_segments, uint64_t seed, int log2_size, int64_t slot,
                       int64_t slots, const float* coords, int64_t m, float scale) {
  const DenseRebuild block{segments, n_segments, seed, log2_size, slot, slots, coords, m, scale};
  dense_reconstruct_many(&block, 1);
}

void dense_reconstruct_many(const DenseRebuild* blocks, int n_blocks) {
  for (int b = 0; b < n_blocks; b++) {
    check(blocks[b].log2_size, blocks[b].slot, blocks[b].slots, blocks[b].rows ? 0 : blocks[b].m);
    for (int64_t k = 0; blocks[b].rows && k < blocks[b].m; k++)
      if (blocks[b].rows[k] < 0 || blocks[b].rows[k] >= (int64_t(1) << blocks[b].log2_size))
        throw std::invalid_argument("row " + std::to_string(blocks[b].rows[k]) + " is outside a Hadamard size of " +
                                    std::to_string(int64_t(1) << blocks[b].log2_size));
  }
  // Every block's transform, then every window of every segment, each on the pool at once.
  struct Window {
    int block, segment;
    int64_t task;
  };
  std::vector<Window> windows;
  int64_t elements = 0, transformed = 0;
  for (int b = 0; b < n_blocks; b++) {
    transformed += int64_t(1) << blocks[b].log2_size;
    for (int s = 0; s < blocks[b].n_segments; s++) {
      const Segment& seg = blocks[b].segments[s];
      if (seg.n == 0) continue;
      for (int64_t t = seg.start / kTask; t <= (seg.start + seg.n - 1) / kTask; t++) windows.push_back({b, s, t});
      elements += seg.n;
    }
  }
  std::vector<std::vector<float>> zs(static_cast<size_t>(n_blocks));
  detail::parallel_for(n_blocks, n_blocks > 1 && transformed >= 2 * kTask ? num_threads() : 1, [&](int64_t b) {
    const DenseRebuild& block = blocks[b];
    const int64_t size = int64_t(1) << block.log2_size;
    std::vector<float>& z = zs[size_t(b)];
    z.assign(static_cast<size_t>(size), 0.0f);
    const auto rows = block.rows ? std::vector<int64_t>(block.rows, block.rows + block.m)
                                 : rows_of(block.seed, size, block.slot, block.slots, block.m);
    for (int64_t k = 0; k < block.m; k++) z[size_t(rows[size_t(k)])] = block.coords[k];
    fwht(z.data(), size);
  });
  detail::parallel_for(int64_t(windows.size()), elements < 2 * kTask ? 1 : num_threads(), [&](int64_t w) {
    const DenseRebuild& block = blocks[windows[size_t(w)].block];
    const Segment& seg = block.segments[windows[size_t(w)].segment];
    const int64_t size = int64_t(1) << block.log2_size, t = windows[size_t(w)].task;
    const float* z = zs[size_t(windows[size_t(w)].block)].data();
    const int64_t lo = std::max(t * kTask, seg.start), hi = std::min((t + 1) * kTask, seg.start + seg.n);
    for (int64_t a = lo; a < hi;) {  // pieces that do not cross a chunk: z repeats every chunk, in its lane order
      const int64_t b = std::min(hi, (a / size + 1) * size);
      add_signed(seg, a, b, z, size, lane_mask(block.seed, a / size, size), block.seed, block.scale);
      a = b;
    }
  });
}

}  // namespace ferret
