#include "tree.hpp"

#include <algorithm>

namespace ferret::detail {

template <class T>
PairwiseTreeOf<T>::PairwiseTreeOf(int64_t width)
    : width_(width), slots_(kLevels), carry_(size_t(width)), index_(), present_() {}
template <class T>
PairwiseTreeOf<T>::~PairwiseTreeOf() = default;

template <class T>
T* PairwiseTreeOf<T>::slot(int level) {
  if (slots_[level].empty()) slots_[level].resize(size_t(width_));
  return slots_[level].data();
}

template <class T>
void PairwiseTreeOf<T>::add(int64_t index, const T* values) {
  std::copy(values, values + width_, carry_.begin());
  carry_up(0, index);
}

// The finished node in carry_ at (level, index) is merged with its left sibling, or goes up alone
// when that sibling is absent, or waits when it is a left node itself. A waiting node whose right
// sibling can no longer come (a later index arrived) goes up alone first.
template <class T>
void PairwiseTreeOf<T>::carry_up(int level, int64_t index) {
  for (;; level++, index >>= 1) {
    if (present_[level] && index_[level] != (index ^ 1)) {
      // Park this node in the slot while the stale one goes up through carry_, then take it back.
      std::swap_ranges(carry_.begin(), carry_.end(), slot(level));
      present_[level] = false;
      carry_up(level + 1, index_[level] >> 1);
      std::swap_ranges(carry_.begin(), carry_.end(), slot(level));
    }
    if (present_[level]) {
      const T* left = slot(level);
      T* carry = carry_.data();
      for (int64_t k = 0; k < width_; k++) carry[k] = left[k] + carry[k];
      present_[level] = false;
    } else if ((index & 1) == 0) {
      std::copy(carry_.begin(), carry_.end(), slot(level));
      index_[level] = index;
      present_[level] = true;
      return;
    }
  }
}

template <class T>
void PairwiseTreeOf<T>::root(T* out) {
  std::fill(out, out + width_, T(0));
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

template class PairwiseTreeOf<double>;
template class PairwiseTreeOf<float>;

}  // namespace ferret::detail
