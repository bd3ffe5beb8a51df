// compactrec::salted_hash - the salted id hash of embeddings/hashing.py in one pass over the ids (CPU).
//
//   out[i, j] = mix64(values[i] ^ salts[feature[i], j])                       (mods is None)
//   out[i, j] = unsigned(mix64(values[i] ^ salts[feature[i], j])) % m         (m = mods[0] or mods[feature[i]])
//
// bit for bit the torch path (embeddings.hashing.salted_hash / unsigned_mod). The modulus is exact: a 128-bit
// multiply-high estimate of the quotient and two branch-free corrections, no hardware divide.
// The schema is defined here (TORCH_LIBRARY) so scripted and exported models can call it; embeddings/fused_hash.py
// adds the fake (meta) kernel and the torch-ops kernel for every other device.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "id_maths.h"

#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

using compactrec::mix64;
using compactrec::umod;

constexpr int64_t kGrain = 1 << 14;  // ids per task: below this a thread hand-off costs more than it saves
constexpr int64_t kMaxModulus = int64_t(1) << 62;

at::Tensor salted_hash_cpu(const at::Tensor& values, const std::optional<at::Tensor>& feature,
                           const at::Tensor& salts, const std::optional<at::Tensor>& mods) {
  TORCH_CHECK(values.dim() == 1 && values.scalar_type() == at::kLong,
              "compactrec::salted_hash: values must be a 1-D int64 tensor, got ", values.dim(), "-D ",
              values.scalar_type());
  TORCH_CHECK(salts.dim() == 2 && salts.scalar_type() == at::kLong && salts.size(0) >= 1,
              "compactrec::salted_hash: salts must be a [F, H] int64 tensor with F >= 1, got shape ",
              salts.sizes(), " ", salts.scalar_type());
  const int64_t n = values.numel();
  const int64_t num_features = salts.size(0);
  const int64_t h = salts.size(1);
  const at::Tensor v = values.contiguous();
  const at::Tensor s = salts.contiguous();
  at::Tensor f;
  if (feature.has_value()) {
    TORCH_CHECK(feature->dim() == 1 && feature->scalar_type() == at::kLong && feature->numel() == n,
                "compactrec::salted_hash: feature must be a 1-D int64 tensor of ", n, " entries, got shape ",
                feature->sizes(), " ", feature->scalar_type());
    f = feature->contiguous();
  }
  std::vector<uint64_t> mod, inv;
  if (mods.has_value()) {
    TORCH_CHECK(mods->dim() == 1 && mods->scalar_type() == at::kLong &&
                    (mods->numel() == 1 || mods->numel() == num_features),
                "compactrec::salted_hash: mods must be a 1-D int64 tensor of 1 or F = ", num_features,
                " moduli, got shape ", mods->sizes(), " ", mods->scalar_type());
    const at::Tensor m = mods->contiguous();
    const int64_t* mp = m.data_ptr<int64_t>();
    for (int64_t i = 0; i < m.numel(); ++i) {
      TORCH_CHECK(mp[i] >= 1 && mp[i] <= kMaxModulus, "compactrec::salted_hash: modulus ", mp[i], " (mods[", i,
                  "]) is outside [1, 2**62]");
      mod.push_back((uint64_t)mp[i]);
      inv.push_back(~uint64_t(0) / (uint64_t)mp[i]);
    }
  }
  at::Tensor out = at::empty({n, h}, values.options());
  if (n == 0) return out;
  const int64_t* vp = v.data_ptr<int64_t>();
  const int64_t* fp = f.defined() ? f.data_ptr<int64_t>() : nullptr;
  const int64_t* sp = s.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  std::atomic<int64_t> bad_feature{-1};
  // one loop per modulus form (no per-id branch on it); an out-of-range feature is reported after the loop
  auto run = [&](auto reduce) {
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t fi = fp ? fp[i] : 0;
        if ((uint64_t)fi >= (uint64_t)num_features) {
          bad_feature.store(i);
          for (int64_t j = 0; j < h; ++j) op[i * h + j] = 0;
          continue;
        }
        const uint64_t x = (uint64_t)vp[i];
        const int64_t* salt = sp + fi * h;
        for (int64_t j = 0; j < h; ++j) op[i * h + j] = (int64_t)reduce(mix64(x ^ (uint64_t)salt[j]), fi);
      }
    });
  };
  if (mod.empty()) {
    run([](uint64_t z, int64_t) { return z; });
  } else if (mod.size() == 1) {
    const uint64_t m = mod[0], q = inv[0];
    run([m, q](uint64_t z, int64_t) { return umod(z, m, q); });
  } else {
    const uint64_t* mp = mod.data();
    const uint64_t* qp = inv.data();
    run([mp, qp](uint64_t z, int64_t fi) { return umod(z, mp[fi], qp[fi]); });
  }
  const int64_t bad = bad_feature.load();
  TORCH_CHECK(bad < 0, "compactrec::salted_hash: feature[", bad, "] = ", fp ? fp[bad] : 0,
              " is outside [0, ", num_features, ") (the rows of salts)");
  return out;
}

}  // namespace

TORCH_LIBRARY(compactrec, m) {
  m.def("salted_hash(Tensor values, Tensor? feature, Tensor salts, Tensor? mods=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(compactrec, CPU, m) {
  m.impl("salted_hash", &salted_hash_cpu);
}
