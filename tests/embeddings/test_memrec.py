"""Single-process MEM-REC: options, identity parity with an EBC, slow references, memory, spec."""

from __future__ import annotations

import copy
from typing import Dict, List, Optional

import pytest
import torch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings import registry
from embeddings.hashing import hash_to_range
from embeddings.memrec import (
    MemRecEmbeddingBagCollection,
    MemRecOptions,
    MemRecPerSampleDLRM,
    MemRecPerSampleEmbeddingBag,
    default_constraints,
    memory,
)
from embeddings.types import SparseArchContext, TopologyInfo
from sharding.sharders import sharders_for

FEATURES = ["f0", "f1", "f2"]
DIM = 4


def _kjt(keys: List[str], lengths: List[int], values: List[int], weights: Optional[List[float]] = None
         ) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.tensor(values, dtype=torch.int64), lengths=torch.tensor(lengths),
        weights=None if weights is None else torch.tensor(weights),
    )


def _batch() -> KeyedJaggedTensor:
    """3 features x batch 3, multi-hot with empty bags, ids negative and above 2**32."""
    lengths = [2, 0, 3,   1, 1, 0,   0, 4, 1]
    values = [5, -3,  2**40, 7, 7,   -(2**62),   11,   1, 2, 3, 2**33,   0]
    return _kjt(FEATURES, lengths, values)


def _options(**kw: object) -> MemRecOptions:
    base: Dict[str, object] = dict(num_token_rows=13, num_weight_rows=5, num_token_hashes=2,
                                   num_weight_hashes=3, shared_tables=False, seed=3)
    base.update(kw)
    return MemRecOptions(**base)  # type: ignore[arg-type]


# ---- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,error", [
    ("num_token_rows", 0, ValueError), ("num_weight_rows", 2**24 + 1, ValueError),
    ("num_token_hashes", 0, ValueError), ("num_weight_hashes", 1.0, TypeError),
    ("seed", -1, ValueError), ("shared_tables", 1, TypeError), ("pooling", "max", ValueError),
    ("weight_init", "zeros", ValueError), ("token_init", "xavier", ValueError),
    ("granularity", "per_feature", ValueError), ("hash", "md5", ValueError),
])
def test_options_reject_bad_values_naming_field_and_value(field: str, value: object, error: type) -> None:
    with pytest.raises(error, match=rf"embeddings\.options\.{field}.*{value}"):
        MemRecOptions(**{field: value})  # type: ignore[arg-type]


def test_options_cross_field_rules() -> None:
    with pytest.raises(ValueError, match="shared_tables"):
        MemRecOptions(granularity="per_sample", shared_tables=False)
    with pytest.raises(ValueError, match="identity"):
        MemRecOptions(hash="identity", num_token_hashes=2)
    assert MemRecOptions(num_weight_rows=2**24).num_weight_rows == 2**24  # float32 carries it exactly


def test_module_rejects_wrong_granularity_and_bad_inputs() -> None:
    with pytest.raises(ValueError, match="granularity"):
        MemRecEmbeddingBagCollection(FEATURES, DIM, MemRecOptions(granularity="per_sample"))
    with pytest.raises(ValueError, match="granularity"):
        MemRecPerSampleEmbeddingBag(FEATURES, DIM, MemRecOptions())
    module = MemRecEmbeddingBagCollection(FEATURES, DIM, _options())
    with pytest.raises(ValueError, match="unweighted"):
        module(_kjt(FEATURES, [1] * 3, [1, 2, 3], weights=[1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="lacks features"):
        module(_kjt(["f0", "f1"], [1, 1], [1, 2]))


# ---- identity hashing equals a plain EmbeddingBagCollection -----------------------------------
@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("shared", [False, True])
def test_identity_hash_equals_plain_ebc(pooling: str, shared: bool) -> None:
    rows = 16  # ids in [0, 16): identity hashing maps each id to its own row
    opts = MemRecOptions(num_token_rows=rows, num_weight_rows=3, hash="identity", weight_init="ones",
                         shared_tables=shared, pooling=pooling)
    module = MemRecEmbeddingBagCollection(FEATURES, DIM, opts)
    module.weight_table.requires_grad_(False)  # fixed at 1: compression is the identity
    mode = PoolingType.MEAN if pooling == "mean" else PoolingType.SUM
    if shared:
        tables = [EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=rows, feature_names=FEATURES,
                                     pooling=mode)]
    else:
        tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=rows, feature_names=[f],
                                     pooling=mode) for f in FEATURES]
    ebc = EmbeddingBagCollection(tables=tables)
    for ours, theirs in zip(module.embedding_bag_configs(), tables):
        ebc.embedding_bags[theirs.name].weight.data.copy_(module.token_ebc.embedding_bags[ours.name].weight)
    gen = torch.Generator().manual_seed(0)
    opt_a = torch.optim.SGD(module.parameters(), lr=0.5)
    opt_b = torch.optim.SGD(ebc.parameters(), lr=0.5)
    for _ in range(3):
        lengths = torch.randint(0, 4, (len(FEATURES) * 5,), generator=gen)
        values = torch.randint(0, rows, (int(lengths.sum()),), generator=gen)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=values, lengths=lengths)
        a, b = module(kjt), ebc(kjt)
        for f in FEATURES:
            torch.testing.assert_close(a[f], b[f], rtol=0, atol=1e-7)
        for opt, out in ((opt_a, a), (opt_b, b)):
            opt.zero_grad()
            (out.values() * torch.linspace(-1, 1, out.values().shape[1])).pow(2).sum().backward()
            opt.step()
    for ours, theirs in zip(module.embedding_bag_configs(), tables):
        torch.testing.assert_close(module.token_ebc.embedding_bags[ours.name].weight,
                                   ebc.embedding_bags[theirs.name].weight, rtol=0, atol=1e-6)


# ---- slow references ----------------------------------------------------------------------------
def _token_table(module: MemRecEmbeddingBagCollection, feature: str) -> torch.Tensor:
    name = module.layout.token_table_name(feature)  # type: ignore[attr-defined]
    return module.token_ebc.embedding_bags[name].weight


def _reference_per_token(module: MemRecEmbeddingBagCollection, kjt: KeyedJaggedTensor) -> Dict[str, torch.Tensor]:
    """z(f, x) = (sum_j w[g_j]) * (sum_k M[h_k]), pooled per bag, written from the definition."""
    o = module.options
    w = module.weight_table.view(-1)
    out: Dict[str, torch.Tensor] = {}
    jts = kjt.to_dict()
    for fi, feature in enumerate(module.layout.feature_names):
        table = _token_table(module, feature)
        w_offset = 0 if o.shared_tables else fi * o.num_weight_rows
        bags = []
        for ids in jts[feature].to_dense():
            pooled = torch.zeros(table.shape[1])
            for x in ids.tolist():
                xt = torch.tensor([x])
                alpha = sum(w[w_offset + int(hash_to_range(xt, fi, o.seed, 2 * j + 1, o.num_weight_rows))]
                            for j in range(o.num_weight_hashes))
                tokens = sum(table[int(hash_to_range(xt, fi, o.seed, 2 * k, o.num_token_rows))]
                             for k in range(o.num_token_hashes))
                pooled = pooled + alpha * tokens
            if o.pooling == "mean":
                pooled = pooled / max(1, len(ids))
            bags.append(pooled)
        out[feature] = torch.stack(bags)
    return out


@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("shared", [False, True])
def test_per_token_matches_slow_reference_forward_and_grads(pooling: str, shared: bool) -> None:
    torch.manual_seed(1)
    module = MemRecEmbeddingBagCollection(FEATURES, DIM, _options(pooling=pooling, shared_tables=shared))
    kjt = _batch()
    got = module(kjt)
    ref = _reference_per_token(module, kjt)
    assert got.keys() == FEATURES
    assert torch.count_nonzero(got["f0"][1]) == 0  # empty bag -> zeros (SUM and MEAN)
    probe = torch.randn(3, DIM)
    loss = sum((got[f] * probe).sum() for f in FEATURES)
    grads = torch.autograd.grad(loss, [module.weight_table] + [_token_table(module, f) for f in FEATURES])
    ref_loss = sum((ref[f] * probe).sum() for f in FEATURES)
    params = [module.weight_table] + [_token_table(module, f) for f in FEATURES]
    ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)
    for f in FEATURES:
        torch.testing.assert_close(got[f], ref[f], rtol=1e-5, atol=1e-7)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r if r is not None else torch.zeros_like(g), rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(grads[0]) > 0  # the weight table learns


def test_input_key_order_and_extra_keys_do_not_matter() -> None:
    module = MemRecEmbeddingBagCollection(FEATURES, DIM, _options(pooling="mean"))
    kjt = _batch()
    jts = kjt.to_dict()
    keys = ["f2", "extra", "f0", "f1"]
    lengths = torch.cat([jts["f2"].lengths(), torch.tensor([1, 1, 1]), jts["f0"].lengths(), jts["f1"].lengths()])
    values = torch.cat([jts["f2"].values(), torch.tensor([4, 5, 6]), jts["f0"].values(), jts["f1"].values()])
    shuffled = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)
    a, b = module(kjt), module(shuffled)
    assert b.keys() == FEATURES
    torch.testing.assert_close(a.values(), b.values())


def _reference_per_sample(module: MemRecPerSampleEmbeddingBag, kjt: KeyedJaggedTensor) -> torch.Tensor:
    o = module.options
    w = module.weight_table.view(-1)
    table = module.token_ebc.embedding_bags[module.layout.token_table_name].weight  # type: ignore[attr-defined]
    dense = {f: jt.to_dense() for f, jt in kjt.to_dict().items()}
    rows = []
    for b in range(kjt.stride()):
        alpha, tokens, count = torch.zeros(()), torch.zeros(table.shape[1]), 0
        for fi, feature in enumerate(module.layout.feature_names):
            for x in dense[feature][b].tolist():
                xt = torch.tensor([x])
                count += 1
                for j in range(o.num_weight_hashes):
                    alpha = alpha + w[int(hash_to_range(xt, fi, o.seed, 2 * j + 1, o.num_weight_rows))]
                for k in range(o.num_token_hashes):
                    tokens = tokens + table[int(hash_to_range(xt, fi, o.seed, 2 * k, o.num_token_rows))]
        z = alpha * tokens
        rows.append(z / max(1, count) if o.pooling == "mean" else z)
    return torch.stack(rows)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_per_sample_matches_slow_reference(pooling: str) -> None:
    torch.manual_seed(2)
    opts = _options(granularity="per_sample", shared_tables=True, pooling=pooling)
    module = MemRecPerSampleEmbeddingBag(FEATURES, DIM, opts)
    kjt = _kjt(FEATURES, [2, 0, 0, 1, 1, 0, 0, 1, 0], [5, -3, 2**40, 7, 9])  # sample 2 is empty
    got = module(kjt)
    assert got.keys() == ["memrec_sample"]
    ref = _reference_per_sample(module, kjt)
    torch.testing.assert_close(got.values(), ref, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(got.values()[2]) == 0
    (g,) = torch.autograd.grad(got.values().sum(), [module.weight_table])
    (r,) = torch.autograd.grad(ref.sum(), [module.weight_table])
    torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_per_sample_dlrm_head_shapes_and_backward() -> None:
    opts = _options(granularity="per_sample", shared_tables=True)
    model = MemRecPerSampleDLRM(MemRecPerSampleEmbeddingBag(FEATURES, 8, opts), dense_in_features=5,
                                dense_arch_layer_sizes=[6, 3], over_arch_layer_sizes=[7, 1])
    first = next(m for m in model.over_arch.modules() if isinstance(m, torch.nn.Linear))
    assert first.in_features == 3 + 8  # bottom output + m, no interaction
    logits = model(torch.randn(3, 5), _batch())
    assert logits.shape == (3, 1)
    logits.sum().backward()
    assert model.sparse_arch.embedding_bag_collection.weight_table.grad is not None


def test_per_token_module_drops_into_torchrec_dlrm() -> None:
    module = MemRecEmbeddingBagCollection(FEATURES, DIM, _options())
    model = DLRM(embedding_bag_collection=module, dense_in_features=5, dense_arch_layer_sizes=[6, DIM],
                 over_arch_layer_sizes=[5, 1])
    logits = model(torch.randn(3, 5), _batch())
    assert logits.shape == (3, 1)
    logits.sum().backward()
    assert module.weight_table.grad is not None and torch.count_nonzero(module.weight_table.grad) > 0


# ---- state dict ---------------------------------------------------------------------------------
def test_state_dict_round_trip_unsharded() -> None:
    torch.manual_seed(0)
    a = MemRecEmbeddingBagCollection(FEATURES, DIM, _options())
    torch.manual_seed(1)
    b = MemRecEmbeddingBagCollection(FEATURES, DIM, _options())
    state = copy.deepcopy(a.state_dict())
    assert set(state) == {"weight_table"} | {f"token_ebc.embedding_bags.memrec_tokens_{f}.weight" for f in FEATURES}
    assert not torch.equal(a(_batch()).values(), b(_batch()).values())
    b.load_state_dict(state)
    torch.testing.assert_close(a(_batch()).values(), b(_batch()).values(), rtol=0, atol=0)


# ---- memory, spec, constraints ------------------------------------------------------------------
def _ctx(device: str = "cpu") -> SparseArchContext:
    return SparseArchContext(feature_names=FEATURES, num_embeddings_per_feature=[100, 200, 300],
                             embedding_dim=DIM, device=torch.device(device), pooling_factors=[1.0, 2.0, 3.0])


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_memory_report_is_exact(device: str) -> None:
    opts = _options()  # D=13, dw=5, K=2, kw=3, one table of each per feature, m=4
    spec = registry.get("memrec")
    module = spec.build(_ctx(device), opts)
    report = memory(module, _ctx(device), opts, "adagrad")
    by_name = {t.name: t for t in report.tables}
    assert set(by_name) == {"memrec_tokens_f0", "memrec_tokens_f1", "memrec_tokens_f2", "memrec_weights",
                            "token_salts", "weight_salts"}
    assert by_name["memrec_tokens_f1"].bytes == 13 * 4 * 4
    assert by_name["memrec_weights"].bytes == 3 * 5 * 1 * 4
    assert by_name["token_salts"].bytes == 3 * 2 * 8 and by_name["weight_salts"].bytes == 3 * 3 * 8
    assert report.parameter_bytes == 3 * 208 + 60 == 684
    assert report.total_bytes == 684 + 48 + 72 == 804
    assert report.optimizer_state_bytes == 684  # Adagrad: one fp32 sum per parameter
    assert memory(module, _ctx(device), opts, "sgd").optimizer_state_bytes == 0
    assert memory(module, _ctx(device), opts, "rowwise_adagrad").optimizer_state_bytes == (3 * 13 + 15) * 4
    assert report.full_table_bytes == 600 * 4 * 4
    assert report.compression_ratio == pytest.approx(9600 / 804)


def test_spec_registration_and_build() -> None:
    spec = registry.get("memrec")
    assert spec.options_type is MemRecOptions and spec.ids == "raw"
    per_token = spec.build(_ctx(), MemRecOptions(num_token_rows=10, num_weight_rows=10))
    assert isinstance(per_token, MemRecEmbeddingBagCollection)
    assert per_token.pooling_factors == [1.0, 2.0, 3.0]
    per_sample = spec.build(_ctx(), MemRecOptions(num_token_rows=10, num_weight_rows=10, granularity="per_sample"))
    assert isinstance(per_sample, MemRecPerSampleEmbeddingBag)
    assert [type(s).__name__ for s in sharders_for(per_token)] == ["MemRecEmbeddingBagCollectionSharder"]


@pytest.mark.parametrize("nodes,expected", [(1, "row_wise"), (2, "table_row_wise")])
def test_default_constraints(nodes: int, expected: str) -> None:
    opts = _options()
    module = registry.get("memrec").build(_ctx("meta"), opts)
    topology = TopologyInfo(world_size=4 * nodes, local_world_size=4, compute_device="cuda")
    constraints = default_constraints(module, opts, topology)
    assert set(constraints) == {"memrec_tokens_f0", "memrec_tokens_f1", "memrec_tokens_f2"}  # weights: not a table
    tokens = constraints["memrec_tokens_f2"]
    assert tokens.sharding_types == [expected] and tokens.compute_kernels == ["fused"]
    assert tokens.pooling_factors == [2 * 3 * 3.0] and tokens.is_weighted is True

    shared = MemRecOptions(num_token_rows=10, num_weight_rows=10, num_token_hashes=2)
    c = default_constraints(registry.get("memrec").build(_ctx("meta"), shared), shared, topology)
    assert c["memrec_tokens"].pooling_factors == [2.0, 4.0, 6.0]
    per_sample = MemRecOptions(num_token_rows=10, num_weight_rows=10, num_token_hashes=2, granularity="per_sample")
    c = default_constraints(registry.get("memrec").build(_ctx("meta"), per_sample), per_sample, topology)
    assert c["memrec_tokens"].pooling_factors == [12.0] and c["memrec_tokens"].is_weighted is False


@pytest.mark.parametrize("num_features,batch,most", [(26, 512, 2), (3, 5, 4), (1, 1, 3), (4, 7, 1), (5, 64, 6)])
def test_sample_major_order_is_the_stable_sort_by_sample(num_features: int, batch: int, most: int) -> None:
    from embeddings.memrec.per_sample import sample_major_order

    gen = torch.Generator().manual_seed(num_features * batch)
    for _ in range(3):  # empty bags, empty samples and multi-hot bags included
        lengths = torch.randint(0, most, (num_features * batch,), generator=gen, dtype=torch.int32)
        n = int(lengths.sum())
        sample = torch.repeat_interleave(torch.arange(num_features * batch), lengths.long(), output_size=n) % batch
        assert torch.equal(sample_major_order(lengths, num_features, batch, n), torch.argsort(sample, stable=True))
