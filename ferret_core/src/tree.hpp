// The spec's pairwise tree: nodes at absolute indices, node 2j plus node 2j + 1 level by level,
// absent nodes counting as 0 (see python/ferret/spec.py). Compress and sum_squares add their
// fp64 group sums through it, the dense Hadamard fold its fp32 chunks, so the result does not
// depend on how the work was cut.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace ferret::detail {

// Vectors of `width` values of T, added in tree order as they arrive in increasing index order.
// The member functions are defined out of line (tree.cpp, for double and float): the AVX2 file
// may use the class.
template <class T>
class PairwiseTreeOf {
 public:
  explicit PairwiseTreeOf(int64_t width);
  ~PairwiseTreeOf();
  PairwiseTreeOf(const PairwiseTreeOf&) = delete;
  PairwiseTreeOf& operator=(const PairwiseTreeOf&) = delete;

  // The node at `index` of level 0 (indices strictly increasing between calls).
  void add(int64_t index, const T* values);
  // Where the next level-0 node may be written in place, before add_leaf(index) takes it.
  T* leaf() { return carry_.data(); }
  void add_leaf(int64_t index) { carry_up(0, index); }
  // The root over every node added so far (zeros if none); the tree is empty again afterwards.
  void root(T* out);

 private:
  static constexpr int kLevels = 64;
  void carry_up(int level, int64_t index);  // the node in carry_ is finished at (level, index)
  T* slot(int level);                       // allocated when a level first holds a node

  int64_t width_;
  std::vector<std::vector<T>> slots_;  // per level: a left node waiting for its right sibling
  std::vector<T> carry_;
  int64_t index_[kLevels];
  bool present_[kLevels];
};

using PairwiseTree = PairwiseTreeOf<double>;

}  // namespace ferret::detail
