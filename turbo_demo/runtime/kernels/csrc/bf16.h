// bf16 <-> fp32 for the kernels: weights may be stored as bf16 (raw uint16 bits of
// c10::BFloat16), arithmetic is always fp32.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace turbo_demo {

using bf16_bits = uint16_t;  // raw storage of c10::BFloat16

inline float to_f32(float v) { return v; }
inline float to_f32(bf16_bits v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;  // bf16 is the top half of an fp32
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline void store(float* out, float v) { *out = v; }
inline void store(bf16_bits* out, float v) { *out = c10::BFloat16(v).x; }  // round to nearest even

// v as it reads back after a store into T: where a separate tensor operation would round.
template <typename T>
inline float rounded(float v) {
  T t;
  store(&t, v);
  return to_f32(t);
}

}  // namespace turbo_demo
