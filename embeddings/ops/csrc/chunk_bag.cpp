// compactrec::chunk_bag_forward / chunk_bag_backward - the embedding stage of the hashed chunk-table methods
// (the hashing trick, ROBE-Z with any chunk size, LMA) in one pass over a batch's ids (CPU).
//
// Forward, for every bag k = f * B + b of a feature-major KJT (lengths [F * B]) and every id x in it:
//   hot:  the id's C chunks are rows hot_base[f] + C * index + c, where index is x's position among feature f's
//         hot values (an open-addressing probe of hot_slots into the sorted hot_keys, exact: see hot_rows.py)
//   else: row(f, x, c) = unsigned(mix64(x ^ salts[f, c])) mod rows[f]        (or addresses[i, c] when given)
//   out[b, (f * C + c) * Z + j] = pool over the bag's ids of weights[table_of_feature[f]][row][j]
// (pooling 0 = sum, 1 = mean; an empty bag is zeros). The addresses [N, C] are returned for the backward.
//
// Backward with a fused optimizer (in place, the same update as fbgemm's TBE: the gradient of each touched row is
// summed over its lookups first, then one update per row): 1 = SGD, 2 = Adagrad (element-wise sum of squares),
// 3 = row-wise Adagrad (the row's mean square). weight_decay adds weight_decay * w to the summed gradient (L2).
// fp16 / bf16 tables: the row is read as float32, updated in float32 (the state is float32) and stored back with
// stochastic rounding (rounding.h; rounding_seed picks the step's random stream); SGD then sums first too.
//
// The Python side (embeddings/ops/chunk_bag.py) registers the torch reference used on every other device, the fake
// kernels for torch.export, and the autograd wiring.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "id_maths.h"
#include "rounding.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using compactrec::mix64;
using compactrec::umod;

constexpr int64_t kMaxModulus = int64_t(1) << 62;

const int64_t* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<int64_t>() : nullptr;
}

void check_long(const std::optional<at::Tensor>& t, const char* name, int64_t numel) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kLong && t->is_contiguous() && t->device().is_cpu(),
              "compactrec::chunk_bag: ", name, " must be a contiguous 1-D int64 CPU tensor, got shape ", t->sizes(),
              " ", t->scalar_type());
  TORCH_CHECK(numel < 0 || t->numel() == numel, "compactrec::chunk_bag: ", name, " must hold ", numel,
              " entries, got ", t->numel());
}

// The hot-row lookup: sorted keys (packed: f << shift | x; verified: f << shift | mix64(x ^ salt_f) >>> (64 -
// shift), confirmed by the stored value) and an open-addressing table of positions into them.
struct Hot {
  const int64_t* keys = nullptr;
  const int32_t* slots = nullptr;
  uint64_t cap = 0, cap_inv = 0;
  const int64_t* starts = nullptr;
  const int64_t* values = nullptr;  // verified mode only
  const int64_t* salts = nullptr;   // verified mode only
  const int64_t* base = nullptr;
  int64_t shift = 0;

  bool active() const { return keys != nullptr; }

  // index of x among feature f's hot values, or -1
  inline int64_t find(int64_t f, int64_t x) const {
    uint64_t q;
    if (values == nullptr) {
      if (x < 0 || (shift < 63 && x >= (int64_t(1) << shift))) return -1;
      q = ((uint64_t)f << shift) | (uint64_t)x;
    } else {
      q = ((uint64_t)f << shift) | (mix64((uint64_t)x ^ (uint64_t)salts[f]) >> (64 - shift));
    }
    uint64_t s = umod(mix64(q), cap, cap_inv);
    while (true) {
      const int32_t p = slots[s];
      if (p < 0) return -1;
      if ((uint64_t)keys[p] == q && (values == nullptr || values[p] == x)) return p - starts[f];
      s = (s + 1 == cap) ? 0 : s + 1;
    }
  }
};

Hot make_hot(const std::optional<at::Tensor>& hot_keys, const std::optional<at::Tensor>& hot_slots,
             const std::optional<at::Tensor>& hot_starts, const std::optional<at::Tensor>& hot_values,
             const std::optional<at::Tensor>& hot_salts, int64_t hot_shift, const std::optional<at::Tensor>& hot_base,
             int64_t num_features) {
  Hot hot;
  if (!hot_keys.has_value()) return hot;
  TORCH_CHECK(hot_slots.has_value() && hot_starts.has_value() && hot_base.has_value(),
              "compactrec::chunk_bag: hot_keys needs hot_slots, hot_starts and hot_base");
  check_long(hot_keys, "hot_keys", -1);
  check_long(hot_starts, "hot_starts", num_features);
  check_long(hot_base, "hot_base", num_features);
  TORCH_CHECK(hot_slots->dim() == 1 && hot_slots->scalar_type() == at::kInt && hot_slots->is_contiguous() &&
                  hot_slots->numel() > hot_keys->numel(),
              "compactrec::chunk_bag: hot_slots must be a contiguous 1-D int32 tensor with more slots than hot keys (",
              hot_keys->numel(), "), got shape ", hot_slots->sizes(), " ", hot_slots->scalar_type());
  TORCH_CHECK(hot_shift >= 1 && hot_shift <= 63, "compactrec::chunk_bag: hot_shift must be in [1, 63], got ",
              hot_shift);
  if (hot_values.has_value() || hot_salts.has_value()) {
    TORCH_CHECK(hot_values.has_value() && hot_salts.has_value(),
                "compactrec::chunk_bag: verified hot keys need both hot_values and hot_salts");
    check_long(hot_values, "hot_values", hot_keys->numel());
    check_long(hot_salts, "hot_salts", num_features);
    hot.values = hot_values->data_ptr<int64_t>();
    hot.salts = hot_salts->data_ptr<int64_t>();
  }
  hot.keys = hot_keys->data_ptr<int64_t>();
  hot.slots = hot_slots->data_ptr<int32_t>();
  hot.cap = (uint64_t)hot_slots->numel();
  hot.cap_inv = ~uint64_t(0) / hot.cap;
  hot.starts = hot_starts->data_ptr<int64_t>();
  hot.base = hot_base->data_ptr<int64_t>();
  hot.shift = hot_shift;
  return hot;
}

struct Tables {
  std::vector<char*> data;
  std::vector<int64_t> rows;
  int64_t width = 0;
  at::ScalarType dtype = at::kFloat;
};

Tables table_views(at::TensorList weights, const char* what) {
  TORCH_CHECK(!weights.empty(), "compactrec::chunk_bag: ", what, " must hold at least one table");
  Tables t;
  t.width = weights[0].dim() == 2 ? weights[0].size(1) : -1;
  t.dtype = weights[0].scalar_type();
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu() && w.size(1) == t.width &&
                    w.scalar_type() == t.dtype,
                "compactrec::chunk_bag: ", what, "[", i, "] must be a contiguous 2-D CPU tensor [rows, ", t.width,
                "] of ", t.dtype, ", got shape ", w.sizes(), " ", w.scalar_type());
    t.data.push_back(static_cast<char*>(w.data_ptr()));
    t.rows.push_back(w.size(0));
  }
  TORCH_CHECK(t.dtype == at::kFloat || t.dtype == at::kHalf || t.dtype == at::kBFloat16,
              "compactrec::chunk_bag: tables must be float32, float16 or bfloat16, got ", t.dtype);
  return t;
}

struct Bags {
  int64_t num_features = 0, batch = 0, n = 0;
  std::vector<int64_t> offsets;  // [F * B + 1]
  std::vector<int64_t> table;    // table of each feature
};

Bags bag_views(const at::Tensor& lengths, const at::Tensor& table_of_feature, int64_t num_tables, int64_t n) {
  TORCH_CHECK(table_of_feature.dim() == 1 && table_of_feature.scalar_type() == at::kLong &&
                  table_of_feature.numel() >= 1,
              "compactrec::chunk_bag: table_of_feature must be a non-empty 1-D int64 tensor, got shape ",
              table_of_feature.sizes());
  TORCH_CHECK(lengths.dim() == 1 && (lengths.scalar_type() == at::kLong || lengths.scalar_type() == at::kInt),
              "compactrec::chunk_bag: lengths must be a 1-D int32/int64 tensor, got shape ", lengths.sizes(), " ",
              lengths.scalar_type());
  Bags bags;
  bags.num_features = table_of_feature.numel();
  TORCH_CHECK(lengths.numel() % bags.num_features == 0, "compactrec::chunk_bag: ", lengths.numel(),
              " lengths are not F x B for F = ", bags.num_features, " features");
  bags.batch = lengths.numel() / bags.num_features;
  const at::Tensor tf = table_of_feature.contiguous();
  for (int64_t f = 0; f < bags.num_features; ++f) {
    const int64_t t = tf.data_ptr<int64_t>()[f];
    TORCH_CHECK(t >= 0 && t < num_tables, "compactrec::chunk_bag: table_of_feature[", f, "] = ", t,
                " is outside [0, ", num_tables, ")");
    bags.table.push_back(t);
  }
  const at::Tensor len = lengths.to(at::kLong).contiguous();
  const int64_t* lp = len.data_ptr<int64_t>();
  bags.offsets.resize(lengths.numel() + 1);
  bags.offsets[0] = 0;
  for (int64_t k = 0; k < lengths.numel(); ++k) {
    TORCH_CHECK(lp[k] >= 0, "compactrec::chunk_bag: lengths[", k, "] = ", lp[k], " is negative");
    bags.offsets[k + 1] = bags.offsets[k] + lp[k];
  }
  TORCH_CHECK(bags.offsets.back() == n, "compactrec::chunk_bag: the lengths sum to ", bags.offsets.back(),
              ", but there are ", n, " ids");
  bags.n = n;
  return bags;
}

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

constexpr int64_t kBlock = 32;     // ids whose memory reads are issued together (prefetched, then used)
constexpr int64_t kAhead = 8;      // ids ahead whose rows the gather prefetches

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }
inline void prefetch_write(const void* p) { __builtin_prefetch(p, 1, 3); }

// The first value of each feature: values are feature-major, feature f's are [starts[f], starts[f + 1]).
std::vector<int64_t> feature_starts(const Bags& bags) {
  std::vector<int64_t> starts(bags.num_features + 1);
  for (int64_t f = 0; f <= bags.num_features; ++f) starts[f] = bags.offsets[f * bags.batch];
  return starts;
}

// Phase 1: the C rows of every id. Blocks of kBlock ids: the hot-slot reads of a block are issued together, then
// the key reads, then the probes resolve (usually at the first slot), so the memory latency of a block overlaps.
void address_kernel(const Bags& bags, const int64_t* vp, const int64_t* sp, const std::vector<uint64_t>& mod,
                    const std::vector<uint64_t>& inv, const Hot& hot, int64_t C, int64_t* ap) {
  const std::vector<int64_t> starts = feature_starts(bags);
  at::parallel_for(0, bags.n, 4096, [&](int64_t begin, int64_t end) {
    int64_t f = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    uint64_t query[kBlock], slot[kBlock];
    int64_t feat[kBlock];
    int32_t pos[kBlock];
    for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
      const int64_t m = std::min(kBlock, end - i0);
      for (int64_t j = 0; j < m; ++j) {
        while (i0 + j >= starts[f + 1]) ++f;
        feat[j] = f;
      }
      if (hot.active()) {
        for (int64_t j = 0; j < m; ++j) {
          const int64_t x = vp[i0 + j], fj = feat[j];
          if (hot.values == nullptr) {
            if (x < 0 || (hot.shift < 63 && x >= (int64_t(1) << hot.shift))) {
              slot[j] = ~uint64_t(0);
              continue;
            }
            query[j] = ((uint64_t)fj << hot.shift) | (uint64_t)x;
          } else {
            query[j] = ((uint64_t)fj << hot.shift) | (mix64((uint64_t)x ^ (uint64_t)hot.salts[fj]) >> (64 - hot.shift));
          }
          slot[j] = umod(mix64(query[j]), hot.cap, hot.cap_inv);
          prefetch(hot.slots + slot[j]);
        }
        for (int64_t j = 0; j < m; ++j) {
          pos[j] = slot[j] == ~uint64_t(0) ? -1 : hot.slots[slot[j]];
          if (pos[j] >= 0) {
            prefetch(hot.keys + pos[j]);
            if (hot.values != nullptr) prefetch(hot.values + pos[j]);
          }
        }
      }
      for (int64_t j = 0; j < m; ++j) {
        const int64_t i = i0 + j, fj = feat[j], x = vp[i];
        int64_t* a = ap + i * C;
        int64_t index = -1;
        if (hot.active() && pos[j] >= 0) {
          uint64_t s = slot[j];
          int32_t p = pos[j];
          while (p >= 0) {  // linear probing from the home slot
            if ((uint64_t)hot.keys[p] == query[j] && (hot.values == nullptr || hot.values[p] == x)) {
              index = p - hot.starts[fj];
              break;
            }
            s = (s + 1 == hot.cap) ? 0 : s + 1;
            p = hot.slots[s];
          }
        }
        if (index >= 0) {
          const int64_t base = hot.base[fj] + C * index;
          for (int64_t c = 0; c < C; ++c) a[c] = base + c;
        } else {
          const int64_t* salt = sp + fj * C;
          for (int64_t c = 0; c < C; ++c) a[c] = (int64_t)umod(mix64((uint64_t)x ^ (uint64_t)salt[c]), mod[fj], inv[fj]);
        }
      }
    }
  });
}

// Phase 2: gather and pool, sample by sample (the output is written in order, not one feature's column at a time:
// 1.5x faster at dim 128, B = 8192, where the fresh output's page faults dominate); the rows of the id kAhead ahead
// in the same feature are prefetched.
template <typename T>
void gather_kernel(const Tables& tables, const Bags& bags, const int64_t* ap, int64_t C, int64_t pooling, float* op,
                   std::atomic<int64_t>& bad) {
  const int64_t F = bags.num_features, B = bags.batch, Z = tables.width, dim = C * Z;
  at::parallel_for(0, F * B, 512, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(dim);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t k = (q % F) * B + q / F;  // sample-major: the output is written in order
      const int64_t f = k / B, b = k - f * B;
      const int64_t t = bags.table[f];
      const T* w = reinterpret_cast<const T*>(tables.data[t]);
      const uint64_t table_rows = (uint64_t)tables.rows[t];
      const int64_t feature_end = bags.offsets[(f + 1) * B];
      float* out = op + b * F * dim + f * dim;
      std::fill(acc.begin(), acc.end(), 0.0f);
      const int64_t lo = bags.offsets[k], hi = bags.offsets[k + 1];
      for (int64_t i = lo; i < hi; ++i) {
        if (i + kAhead < feature_end) {
          const int64_t* ahead = ap + (i + kAhead) * C;
          for (int64_t c = 0; c < C; ++c)
            if ((uint64_t)ahead[c] < table_rows) prefetch(w + ahead[c] * Z);
        }
        const int64_t* a = ap + i * C;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t r = a[c];
          if ((uint64_t)r >= table_rows) {
            bad.store(i);
            continue;
          }
          const T* row = w + r * Z;
          float* dst = acc.data() + c * Z;
          for (int64_t j = 0; j < Z; ++j) dst[j] += to_float(row[j]);
        }
      }
      const float scale = (pooling == 1 && hi > lo) ? 1.0f / (float)(hi - lo) : 1.0f;
      for (int64_t j = 0; j < dim; ++j) out[j] = acc[j] * scale;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> chunk_bag_forward_cpu(
    at::TensorList weights, const at::Tensor& values, const at::Tensor& lengths, const at::Tensor& table_of_feature,
    const std::optional<at::Tensor>& salts, const std::optional<at::Tensor>& rows,
    const std::optional<at::Tensor>& addresses, const std::optional<at::Tensor>& hot_keys,
    const std::optional<at::Tensor>& hot_slots, const std::optional<at::Tensor>& hot_starts,
    const std::optional<at::Tensor>& hot_values, const std::optional<at::Tensor>& hot_salts, int64_t hot_shift,
    const std::optional<at::Tensor>& hot_base, int64_t num_chunks, int64_t pooling) {
  TORCH_CHECK(values.dim() == 1 && values.scalar_type() == at::kLong,
              "compactrec::chunk_bag_forward: values must be a 1-D int64 tensor, got ", values.sizes(), " ",
              values.scalar_type());
  TORCH_CHECK(pooling == 0 || pooling == 1, "compactrec::chunk_bag_forward: pooling must be 0 (sum) or 1 (mean)");
  TORCH_CHECK(num_chunks >= 1, "compactrec::chunk_bag_forward: num_chunks must be >= 1");
  const Tables tables = table_views(weights, "weights");
  const int64_t n = values.numel(), C = num_chunks;
  const Bags bags = bag_views(lengths, table_of_feature, (int64_t)weights.size(), n);
  const int64_t F = bags.num_features;
  const at::Tensor v = values.contiguous();
  const bool given = addresses.has_value();
  at::Tensor addr;
  std::vector<uint64_t> mod, inv;
  at::Tensor s;
  if (given) {
    TORCH_CHECK(addresses->dim() == 2 && addresses->size(0) == n && addresses->size(1) == C &&
                    addresses->scalar_type() == at::kLong,
                "compactrec::chunk_bag_forward: addresses must be [", n, ", ", C, "] int64, got ", addresses->sizes());
    addr = addresses->contiguous();
  } else {
    TORCH_CHECK(salts.has_value() && rows.has_value(),
                "compactrec::chunk_bag_forward: without addresses, salts and rows are needed");
    TORCH_CHECK(salts->dim() == 2 && salts->size(0) == F && salts->size(1) == C && salts->scalar_type() == at::kLong,
                "compactrec::chunk_bag_forward: salts must be [F, C] = [", F, ", ", C, "] int64, got ", salts->sizes());
    s = salts->contiguous();
    check_long(rows, "rows", F);
    const int64_t* rp = rows->data_ptr<int64_t>();
    for (int64_t f = 0; f < F; ++f) {
      TORCH_CHECK(rp[f] >= 1 && rp[f] <= kMaxModulus && rp[f] <= tables.rows[bags.table[f]],
                  "compactrec::chunk_bag_forward: rows[", f, "] = ", rp[f], " must be in [1, ",
                  tables.rows[bags.table[f]], "] (the rows of its table)");
      mod.push_back((uint64_t)rp[f]);
      inv.push_back(~uint64_t(0) / (uint64_t)rp[f]);
    }
    addr = at::empty({n, C}, values.options());
  }
  const Hot hot = given ? Hot() : make_hot(hot_keys, hot_slots, hot_starts, hot_values, hot_salts, hot_shift,
                                           hot_base, F);
  at::Tensor out = at::empty({bags.batch, F * C * tables.width}, values.options().dtype(at::kFloat));
  std::atomic<int64_t> bad{-1};
  const int64_t* sp = s.defined() ? s.data_ptr<int64_t>() : nullptr;
  int64_t* ap = addr.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t* vp = v.data_ptr<int64_t>();
  if (!given) address_kernel(bags, vp, sp, mod, inv, hot, C, ap);
  switch (tables.dtype) {
    case at::kHalf: gather_kernel<c10::Half>(tables, bags, ap, C, pooling, op, bad); break;
    case at::kBFloat16: gather_kernel<c10::BFloat16>(tables, bags, ap, C, pooling, op, bad); break;
    default: gather_kernel<float>(tables, bags, ap, C, pooling, op, bad); break;
  }
  const int64_t b = bad.load();
  TORCH_CHECK(b < 0, "compactrec::chunk_bag_forward: id ", b, " addresses a row outside its table");
  return {out, addr};
}

// ---- backward with a fused optimizer -----------------------------------------------------------------------
struct Partition {
  std::vector<int64_t> table, row;  // unique (table, row) in first-touch order
  std::vector<float> grad;          // [U, Z], summed
};

void backward_cpu(at::TensorList weights, at::TensorList states, const at::Tensor& grad_out,
                  const at::Tensor& addresses, const at::Tensor& lengths, const at::Tensor& table_of_feature,
                  int64_t num_chunks, int64_t pooling, int64_t optimizer, double lr, double eps, double weight_decay,
                  at::TensorList scratch, int64_t rounding_seed) {
  TORCH_CHECK(optimizer >= 1 && optimizer <= 3,
              "compactrec::chunk_bag_backward: optimizer must be 1 (sgd), 2 (adagrad) or 3 (rowwise_adagrad), got ",
              optimizer);
  const Tables tables = table_views(weights, "weights");
  const int64_t C = num_chunks, Z = tables.width, T = (int64_t)weights.size();
  TORCH_CHECK(addresses.dim() == 2 && addresses.size(1) == C && addresses.scalar_type() == at::kLong &&
                  addresses.is_contiguous(),
              "compactrec::chunk_bag_backward: addresses must be a contiguous [N, ", C, "] int64 tensor");
  const int64_t n = addresses.size(0);
  const Bags bags = bag_views(lengths, table_of_feature, T, n);
  const int64_t F = bags.num_features, B = bags.batch, dim = C * Z;
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == B && grad_out.size(1) == F * dim &&
                  grad_out.scalar_type() == at::kFloat,
              "compactrec::chunk_bag_backward: grad_out must be [", B, ", ", F * dim, "] float32, got ",
              grad_out.sizes(), " ", grad_out.scalar_type());
  TORCH_CHECK((int64_t)scratch.size() == T, "compactrec::chunk_bag_backward: one scratch map per table");
  std::vector<int32_t*> map(T);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(scratch[t].dim() == 1 && scratch[t].numel() == tables.rows[t] && scratch[t].scalar_type() == at::kInt &&
                    scratch[t].is_contiguous(),
                "compactrec::chunk_bag_backward: scratch[", t, "] must be int32 [", tables.rows[t], "] filled with -1");
    map[t] = scratch[t].data_ptr<int32_t>();
  }
  std::vector<float*> state(T, nullptr);
  if (optimizer >= 2) {
    TORCH_CHECK((int64_t)states.size() == T, "compactrec::chunk_bag_backward: one optimizer state per table");
    for (int64_t t = 0; t < T; ++t) {
      const int64_t want = optimizer == 2 ? tables.rows[t] * Z : tables.rows[t];
      TORCH_CHECK(states[t].numel() == want && states[t].scalar_type() == at::kFloat && states[t].is_contiguous(),
                  "compactrec::chunk_bag_backward: states[", t, "] must be ", want, " contiguous float32 values, got ",
                  states[t].sizes());
      state[t] = states[t].data_ptr<float>();
    }
  }
  const at::Tensor g = grad_out.contiguous();
  const float* gp = g.data_ptr<float>();
  const int64_t* ap = addresses.data_ptr<int64_t>();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n * C / 8192 + 1));
  std::atomic<int64_t> bad{-1};
  const float flr = (float)lr, feps = (float)eps, fwd = (float)weight_decay;
  // visits every (id, chunk) pair of partition p (rows with row % parts == p), sample by sample: fn(t, r, grad row)
  auto for_pairs = [&](int64_t p, auto&& fn) {
    for (int64_t q = 0; q < F * B; ++q) {
      const int64_t k = (q % F) * B + q / F;  // sample-major: the output gradient is read in order
      const int64_t lo = bags.offsets[k], hi = bags.offsets[k + 1];
      if (lo == hi) continue;
      const int64_t f = k / B, b = k - f * B, t = bags.table[f];
      const float scale = pooling == 1 ? 1.0f / (float)(hi - lo) : 1.0f;
      const float* gb = gp + b * F * dim + f * dim;
      for (int64_t i = lo; i < hi; ++i) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t r = ap[i * C + c];
          if ((uint64_t)r >= (uint64_t)tables.rows[t]) {
            bad.store(i);
            continue;
          }
          if (parts > 1 && r % parts != p) continue;
          fn(t, r, gb + c * Z, scale, i * C + c);
        }
      }
    }
  };
  if (optimizer == 1 && tables.dtype == at::kFloat) {
    // SGD is linear: each lookup's step applied in turn is the summed step (up to float rounding), no map needed
    at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
      for (int64_t p = pb; p < pe; ++p) {
        for_pairs(p, [&](int64_t t, int64_t r, const float* src, float scale, int64_t pair) {
          if (pair + kAhead < n * C) {
            const int64_t ahead = ap[pair + kAhead];
            if ((uint64_t)ahead < (uint64_t)tables.rows[t]) prefetch_write(reinterpret_cast<float*>(tables.data[t]) + ahead * Z);
          }
          float* w = reinterpret_cast<float*>(tables.data[t]) + r * Z;
          const float step = flr * scale;
          for (int64_t j = 0; j < Z; ++j) w[j] -= step * src[j];
        });
      }
    });
    const int64_t b = bad.load();
    TORCH_CHECK(b < 0, "compactrec::chunk_bag_backward: id ", b, " addresses a row outside its table");
    return;
  }
  std::vector<Partition> part(parts);
  // 1. sum the gradient of every touched row; partition p owns the rows with row % parts == p
  at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p) {
      Partition& mine = part[p];
      mine.table.reserve(n * C / parts + 1);
      mine.row.reserve(n * C / parts + 1);
      mine.grad.reserve((n * C / parts + 1) * Z);
      for_pairs(p, [&](int64_t t, int64_t r, const float* src, float scale, int64_t pair) {
        if (pair + kAhead < n * C) {
          const int64_t ahead = ap[pair + kAhead];
          if ((uint64_t)ahead < (uint64_t)tables.rows[t]) prefetch(map[t] + ahead);
        }
        int32_t slot = map[t][r];
        if (slot < 0) {
          slot = (int32_t)mine.table.size();
          map[t][r] = slot;
          mine.table.push_back(t);
          mine.row.push_back(r);
          mine.grad.insert(mine.grad.end(), src, src + Z);
          float* dst = mine.grad.data() + (int64_t)slot * Z;
          if (scale != 1.0f)
            for (int64_t j = 0; j < Z; ++j) dst[j] *= scale;
        } else {
          float* dst = mine.grad.data() + (int64_t)slot * Z;
          for (int64_t j = 0; j < Z; ++j) dst[j] += src[j] * scale;
        }
      });
    }
  });
  // 2. one update per touched row, in float32; the scratch map is left all -1 again. fp16 / bf16 tables store the
  // updated row stochastically rounded (rounding.h), with the random stream of (rounding_seed, table, element).
  std::vector<uint64_t> stream(T);
  for (int64_t t = 0; t < T; ++t) stream[t] = compactrec::rounding_stream(rounding_seed, t);
  auto update_rows = [&](auto tag) {
    using Elem = decltype(tag);
    at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
      std::vector<float> cur(Z);
      for (int64_t p = pb; p < pe; ++p) {
        Partition& mine = part[p];
        const size_t count = mine.row.size();
        for (size_t u = 0; u < count; ++u) {
          if (u + kAhead < count) {
            const int64_t ta = mine.table[u + kAhead], ra = mine.row[u + kAhead];
            prefetch_write(reinterpret_cast<Elem*>(tables.data[ta]) + ra * Z);
            if (optimizer >= 2) prefetch_write(state[ta] + (optimizer == 2 ? ra * Z : ra));
          }
          const int64_t t = mine.table[u], r = mine.row[u];
          map[t][r] = -1;
          Elem* w = reinterpret_cast<Elem*>(tables.data[t]) + r * Z;
          for (int64_t j = 0; j < Z; ++j) cur[j] = to_float(w[j]);
          float* gr = mine.grad.data() + u * Z;
          if (fwd != 0.0f && optimizer >= 2)
            for (int64_t j = 0; j < Z; ++j) gr[j] += fwd * cur[j];
          if (optimizer == 1) {
            for (int64_t j = 0; j < Z; ++j) cur[j] -= flr * gr[j];
          } else if (optimizer == 2) {
            float* m = state[t] + r * Z;
            for (int64_t j = 0; j < Z; ++j) {
              m[j] += gr[j] * gr[j];
              cur[j] -= flr * gr[j] / (std::sqrt(m[j]) + feps);
            }
          } else {
            float sq = 0.0f;
            for (int64_t j = 0; j < Z; ++j) sq += gr[j] * gr[j];
            float& m = state[t][r];
            m += sq / (float)Z;
            const float mult = flr / (std::sqrt(m) + feps);
            for (int64_t j = 0; j < Z; ++j) cur[j] -= mult * gr[j];
          }
          if constexpr (std::is_same_v<Elem, float>) {
            for (int64_t j = 0; j < Z; ++j) w[j] = cur[j];
          } else if constexpr (std::is_same_v<Elem, c10::Half>) {
            for (int64_t j = 0; j < Z; ++j) w[j] = compactrec::round_half(cur[j], compactrec::rounding_bits(stream[t], r * Z + j));
          } else {
            for (int64_t j = 0; j < Z; ++j)
              w[j] = compactrec::round_bfloat16(cur[j], compactrec::rounding_bits(stream[t], r * Z + j));
          }
        }
      }
    });
  };
  switch (tables.dtype) {
    case at::kHalf: update_rows(c10::Half()); break;
    case at::kBFloat16: update_rows(c10::BFloat16()); break;
    default: update_rows(0.0f); break;
  }
  const int64_t b = bad.load();
  TORCH_CHECK(b < 0, "compactrec::chunk_bag_backward: id ", b, " addresses a row outside its table");
}

// ---- the hot table's open-addressing slots --------------------------------------------------------------
at::Tensor hot_slots_cpu(const at::Tensor& keys, int64_t capacity) {
  TORCH_CHECK(keys.dim() == 1 && keys.scalar_type() == at::kLong, "compactrec::hot_slots: keys must be 1-D int64");
  TORCH_CHECK(capacity > keys.numel() && capacity < (int64_t(1) << 31),
              "compactrec::hot_slots: capacity must exceed the number of keys (", keys.numel(), ") and fit int32, got ",
              capacity);
  const at::Tensor k = keys.contiguous();
  const int64_t* kp = k.data_ptr<int64_t>();
  at::Tensor slots = at::empty({capacity}, keys.options().dtype(at::kInt));
  int32_t* sp = slots.data_ptr<int32_t>();
  std::fill(sp, sp + capacity, -1);
  const uint64_t cap = (uint64_t)capacity, inv = ~uint64_t(0) / cap;
  for (int64_t i = 0; i < k.numel(); ++i) {
    uint64_t s = umod(mix64((uint64_t)kp[i]), cap, inv);
    while (sp[s] >= 0) {
      TORCH_CHECK(kp[sp[s]] != kp[i], "compactrec::hot_slots: key ", kp[i], " appears twice");
      s = (s + 1 == cap) ? 0 : s + 1;
    }
    sp[s] = (int32_t)i;
  }
  return slots;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(compactrec, m) {
  m.def("chunk_bag_forward(Tensor[] weights, Tensor values, Tensor lengths, Tensor table_of_feature, Tensor? salts, "
        "Tensor? rows, Tensor? addresses, Tensor? hot_keys, Tensor? hot_slots, Tensor? hot_starts, "
        "Tensor? hot_values, Tensor? hot_salts, int hot_shift, Tensor? hot_base, int num_chunks, int pooling) "
        "-> (Tensor, Tensor)");
  m.def("chunk_bag_backward(Tensor(a!)[] weights, Tensor(b!)[] states, Tensor grad_out, Tensor addresses, "
        "Tensor lengths, Tensor table_of_feature, int num_chunks, int pooling, int optimizer, float lr, float eps, "
        "float weight_decay, Tensor(c!)[] scratch, int rounding_seed=0) -> ()");
  m.def("hot_slots(Tensor keys, int capacity) -> Tensor");
}

TORCH_LIBRARY_IMPL(compactrec, CPU, m) {
  m.impl("chunk_bag_forward", &chunk_bag_forward_cpu);
  m.impl("chunk_bag_backward", &backward_cpu);
  m.impl("hot_slots", &hot_slots_cpu);
}
