// The spec's pairwise tree: nodes at absolute indices, node 2j plus node 2j + 1 level by level,
// absent nodes counting as 0 (see python/ferret/spec.py). Compress and sum_squares add their
// group sums through it, so the result does not depend on how the work was cut.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace ferret::detail {

// Vectors of `width` fp64 values, added in tree order as they arrive in increasing index order.
// The member functions are defined out of line (tree.cpp): the AVX2 file may use the class.
class PairwiseTree {
 public:
  explicit PairwiseTree(int width);
  ~PairwiseTree();
  PairwiseTree(const PairwiseTree&) = delete;
  PairwiseTree& operator=(const PairwiseTree&) = delete;

  // The node at `index` of level 0 (indices strictly increasing between calls).
  void add(int64_t index, const double* values);
  // The root over every node added so far (zeros if none); the tree is empty again afterwards.
  void root(double* out);

 private:
  static constexpr int kLevels = 64;
  void carry_up(int level, int64_t index);  // the node in carry_ is finished at (level, index)
  double* slot(int level) { return slots_.data() + size_t(level) * width_; }

  int width_;
  std::vector<double> slots_;  // per level: a left node waiting for its right sibling
  std::vector<double> carry_;
  int64_t index_[kLevels];
  bool present_[kLevels];
};

}  // namespace ferret::detail
