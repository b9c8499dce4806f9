#include "tree.hpp"

#include <algorithm>

namespace ferret::detail {

PairwiseTree::PairwiseTree(int width)
    : width_(width), slots_(size_t(kLevels) * width), carry_(width), index_(), present_() {}
PairwiseTree::~PairwiseTree() = default;

void PairwiseTree::add(int64_t index, const double* values) {
  std::copy(values, values + width_, carry_.begin());
  carry_up(0, index);
}

// The finished node in carry_ at (level, index) is merged with its left sibling, or goes up alone
// when that sibling is absent, or waits when it is a left node itself. A waiting node whose right
// sibling can no longer come (a later index arrived) goes up alone first.
void PairwiseTree::carry_up(int level, int64_t index) {
  for (;; level++, index >>= 1) {
    if (present_[level] && index_[level] != (index ^ 1)) {
      // Park this node in the slot while the stale one goes up through carry_, then take it back.
      std::swap_ranges(carry_.begin(), carry_.end(), slot(level));
      present_[level] = false;
      carry_up(level + 1, index_[level] >> 1);
      std::swap_ranges(carry_.begin(), carry_.end(), slot(level));
    }
    if (present_[level]) {
      const double* left = slot(level);
      for (int k = 0; k < width_; k++) carry_[k] = left[k] + carry_[k];
      present_[level] = false;
    } else if ((index & 1) == 0) {
      std::copy(carry_.begin(), carry_.end(), slot(level));
      index_[level] = index;
      present_[level] = true;
      return;
    }
  }
}

void PairwiseTree::root(double* out) {
  std::fill(out, out + width_, 0.0);
  for (int level = 0; level < kLevels; level++) {
    if (!present_[level]) continue;
    present_[level] = false;
    const bool last = std::none_of(present_ + level + 1, present_ + kLevels, [](bool p) { return p; });
    std::copy(slot(level), slot(level) + width_, carry_.begin());
    if (last) {
      std::copy(carry_.begin(), carry_.end(), out);
      break;
    }
    carry_up(level + 1, index_[level] >> 1);
  }
  std::fill(present_, present_ + kLevels, false);
}

}  // namespace ferret::detail
