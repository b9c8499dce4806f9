// Scalar Philox4x32-10 and the constants shared by every implementation.
#pragma once

#include <cstdint>

namespace ferret::detail {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

static inline void philox(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < kPhiloxRounds; r++) {
    const uint64_t p0 = uint64_t(kPhiloxM0) * c[0], p1 = uint64_t(kPhiloxM1) * c[2];
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c[1] ^ k0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c[3] ^ k1;
    c[1] = uint32_t(p1);
    c[3] = uint32_t(p0);
    c[0] = n0;
    c[2] = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// Words of tl.randint4x(seed, (k << 32) | group): counter (group, k, 0, 0).
static inline void basis_words(uint64_t seed, uint32_t k, uint32_t group, uint32_t out[4]) {
  out[0] = group;
  out[1] = k;
  out[2] = 0;
  out[3] = 0;
  philox(out, uint32_t(seed), uint32_t(seed >> 32));
}

}  // namespace ferret::detail
