// The id maths every compactrec kernel shares, bit for bit embeddings/hashing.py.
#pragma once
#include <cstdint>

namespace compactrec {

// splitmix64's output function (embeddings.hashing.mix64)
inline uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// x mod n for n >= 1, inv = floor((2^64 - 1) / n): q = mulhi(x, inv) underestimates floor(x / n) by at most 2, so
// r = x - q n is in [0, 3n); two branch-free corrections (a branch would be unpredictable).
inline uint64_t umod(uint64_t x, uint64_t n, uint64_t inv) {
  uint64_t q = (uint64_t)(((unsigned __int128)x * inv) >> 64);
  uint64_t r = x - q * n;
  r -= (r >= n) ? n : 0;
  r -= (r >= n) ? n : 0;
  return r;
}

}  // namespace compactrec
