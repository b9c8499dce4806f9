// Element loads and stores for fp32 / bf16 / fp16 buffers, widening to fp32 and rounding back to
// nearest-even. Bit manipulation only, so every build of the core rounds identically.
#pragma once

#include <cstdint>
#include <cstring>

#include "ferret_core/ferret_core.hpp"

namespace ferret::detail {

static inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline float bf16_to_float(uint16_t h) { return float_of(uint32_t(h) << 16); }

static inline uint16_t float_to_bf16(float f) {
  const uint32_t u = bits_of(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1f) return float_of(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return float_of(sign);
    exp = 113;  // renormalise a subnormal half
    while (!(mant & 0x400u)) {
      mant <<= 1;
      exp--;
    }
    return float_of(sign | (exp << 23) | ((mant & 0x3ffu) << 13));
  }
  return float_of(sign | ((exp + 112) << 23) | (mant << 13));
}

static inline uint16_t float_to_f16(float value) {
  uint32_t f = bits_of(value);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint32_t h;
  if (f >= 0x47800000u) {  // overflow to Inf, or Inf / NaN
    h = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (f < 0x38800000u) {  // subnormal or zero half: let an fp32 add do the rounding
    const uint32_t magic = 126u << 23;
    h = bits_of(float_of(f) + float_of(magic)) - magic;
  } else {
    const uint32_t odd = (f >> 13) & 1u;
    f += (uint32_t(15 - 127) << 23) + 0xfffu + odd;
    h = f >> 13;
  }
  return uint16_t(h | (sign >> 16));
}

static inline float load_element(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::f32:
      return static_cast<const float*>(p)[i];
    case DType::bf16:
      return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default:
      return f16_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}

// x[i] - base[i] as subtracting the two buffers in their own dtype gives it (fp32: the fp32
// difference; bf16 / fp16: that difference rounded to the dtype, as torch subtracts such tensors),
// widened to fp32: what compressing a materialised difference would read.
static inline float load_difference(const void* x, const void* base, DType dt, int64_t i) {
  const float d = load_element(x, dt, i) - load_element(base, dt, i);
  switch (dt) {
    case DType::f32:
      return d;
    case DType::bf16:
      return bf16_to_float(float_to_bf16(d));
    default:
      return f16_to_float(float_to_f16(d));
  }
}

// buf[j] = element first + j of x, or of x - base where base is given, as fp32, for j < n.
static inline void read_elements(float* buf, const void* x, const void* base, DType dt, int64_t first, int64_t n) {
  if (base) {
    for (int64_t j = 0; j < n; j++) buf[j] = load_difference(x, base, dt, first + j);
  } else if (dt == DType::f32) {
    std::memcpy(buf, static_cast<const float*>(x) + first, size_t(n) * 4);
  } else {
    for (int64_t j = 0; j < n; j++) buf[j] = load_element(x, dt, first + j);
  }
}

static inline void store_element(void* p, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::f32:
      static_cast<float*>(p)[i] = v;
      break;
    case DType::bf16:
      static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
      break;
    default:
      static_cast<uint16_t*>(p)[i] = float_to_f16(v);
  }
}

// out[j] = out[j] + acc[j] * scale for j < n: two roundings, never fused.
static inline void apply_update(void* out, DType dt, int64_t first, const float* acc, int64_t n, float scale) {
  if (dt == DType::f32) {
    float* o = static_cast<float*>(out) + first;
    for (int64_t j = 0; j < n; j++) o[j] = o[j] + acc[j] * scale;
    return;
  }
  for (int64_t j = 0; j < n; j++) store_element(out, dt, first + j, load_element(out, dt, first + j) + acc[j] * scale);
}

}  // namespace ferret::detail
