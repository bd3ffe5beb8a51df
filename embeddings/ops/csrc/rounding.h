// Stochastic rounding of float32 values to fp16 / bf16 table elements, bit for bit embeddings/ops/rounding.py.
//
// The random number of element j of row r of table t in backward call `seed` is
//   u = (mix64(mix64(mix64(seed) ^ t) ^ (r * Z + j)) >> 40) / 2^24, uniform on a 2^24 grid in [0, 1).
// fp16: with s = 2^(max(e, -14) - 10) the fp16 spacing at |x| (e = floor(log2 |x|)), lo = floor(|x| / s) * s:
//   |result| = lo + s when u < (|x| - lo) / s, else lo (every step exact in float32), saturated at 65504.
// bf16: the float32 bits of |x| plus the top 16 bits of u's 24, truncated to bf16 (carry probability = the
//   truncated fraction), saturated at the largest finite bf16.
// The sign is x's; inf and NaN pass through.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "id_maths.h"

namespace compactrec {

inline uint64_t rounding_stream(int64_t seed, int64_t table) {
  return mix64(mix64((uint64_t)seed) ^ (uint64_t)table);
}

inline uint32_t rounding_bits(uint64_t stream, int64_t element) {
  return (uint32_t)(mix64(stream ^ (uint64_t)element) >> 40);  // 24 bits
}

inline c10::Half round_half(float x, uint32_t u24) {
  if (!std::isfinite(x)) return c10::Half(x);
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  int32_t e = (int32_t)((bits >> 23) & 0xFF) - 127;
  if (e < -14) e = -14;
  const uint32_t spacing_bits = (uint32_t)(e - 10 + 127) << 23;
  float spacing;
  std::memcpy(&spacing, &spacing_bits, 4);
  const float q = std::fabs(x) / spacing;
  const float lo = std::floor(q);
  const float frac = q - lo;
  const float u = (float)u24 * 5.9604644775390625e-8f;  // 2^-24
  float m = (lo + (u < frac ? 1.0f : 0.0f)) * spacing;
  if (m > 65504.0f) m = 65504.0f;
  return c10::Half(std::copysign(m, x));
}

inline c10::BFloat16 round_bfloat16(float x, uint32_t u24) {
  if (!std::isfinite(x)) return c10::BFloat16(x);
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint32_t sign = bits & 0x80000000u;
  uint32_t mag = ((bits & 0x7FFFFFFFu) + (u24 >> 8)) & 0xFFFF0000u;
  if (mag > 0x7F7F0000u) mag = 0x7F7F0000u;
  c10::BFloat16 out;
  out.x = (uint16_t)((sign | mag) >> 16);
  return out;
}

}  // namespace compactrec
