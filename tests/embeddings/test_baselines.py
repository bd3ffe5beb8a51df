"""Single-process baselines (hash, robe, qr): options, forward against each method's definition written out
slowly, identity settings equal to a plain EmbeddingBagCollection (also after SGD steps), memory accounting
and DLRM integration."""

from __future__ import annotations

import math
from typing import Callable, Dict, List

import pytest
import torch
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings import registry
from embeddings.remap import RemappedEmbeddingBagCollection
from embeddings.hashing import hash_to_range
from embeddings.hashing_trick import HashedEmbeddingBagCollection, HashOptions
from embeddings.qr import QREmbeddingBagCollection, QrOptions
from embeddings.robe import RobeEmbeddingBagCollection, RobeOptions
from embeddings.types import SparseArchContext

FEATURES = ["f0", "f1", "f2"]
SIZES = [40, 25, 60]
DIM = 8


def _ctx(device: str = "cpu") -> SparseArchContext:
    return SparseArchContext(FEATURES, SIZES, DIM, torch.device(device))


def _kjt(seed: int, batch: int = 5, high: int = 2**40) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(FEATURES) * batch,), generator=gen)
    values = torch.randint(-high, high, (int(lengths.sum()),), generator=gen)
    return KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=values, lengths=lengths)


def _pool(vectors: List[torch.Tensor], pooling: str) -> torch.Tensor:
    total = torch.stack(vectors).sum(0) if vectors else torch.zeros(DIM)
    return total / max(1, len(vectors)) if pooling == "mean" else total


def _check_against(module: nn.Module, kjt: KeyedJaggedTensor, pooling: str,
                   embed: Callable[[int, int], torch.Tensor]) -> None:
    """``module(kjt)`` == per-bag pooling of ``embed(feature index, raw id)``."""
    out = module(kjt)
    assert out.keys() == FEATURES and out.values().shape[1] == len(FEATURES) * DIM
    for f, feature in enumerate(FEATURES):
        want = torch.stack([_pool([embed(f, x) for x in ids.tolist()], pooling) for ids in kjt[feature].to_dense()])
        torch.testing.assert_close(out[feature], want, rtol=0, atol=1e-6)


# ---- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize("options_type,field,value,error", [
    (HashOptions, "num_rows", 0, ValueError), (HashOptions, "hash", "md5", ValueError),
    (HashOptions, "memory_fraction", 0.0, ValueError), (HashOptions, "seed", 1.5, TypeError),
    (RobeOptions, "chunk_size", 0, ValueError), (RobeOptions, "hash", "x", ValueError),
    (RobeOptions, "pooling", "max", ValueError),
    (QrOptions, "num_collisions", 0, ValueError), (QrOptions, "remainder_init", "zeros", ValueError),
    (QrOptions, "hash", "md5", ValueError),
])
def test_options_reject_bad_values_naming_field(options_type: type, field: str, value: object, error: type) -> None:
    with pytest.raises(error, match=rf"embeddings\.options\.{field}"):
        options_type(**{field: value})


# ---- forward against the definitions -------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_hash_matches_definition(pooling: str) -> None:
    module = HashedEmbeddingBagCollection(_ctx(), HashOptions(memory_fraction=0.2, pooling=pooling, seed=9))
    rows = [round(0.2 * n) for n in SIZES]
    tables = [module.ebc.embedding_bags[f"hash_{f}"].weight for f in FEATURES]
    assert [t.shape[0] for t in tables] == rows
    _check_against(module, _kjt(1), pooling,
                   lambda f, x: tables[f][int(hash_to_range(torch.tensor([x]), f, 9, 0, rows[f]))])


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_robe_matches_definition(pooling: str) -> None:
    module = RobeEmbeddingBagCollection(_ctx(), RobeOptions(num_rows=37, chunk_size=2, pooling=pooling, seed=9))
    table = module.ebc.embedding_bags["robe_memory"].weight
    assert table.shape == (37, 2)

    def embed(f: int, x: int) -> torch.Tensor:
        return torch.cat([table[int(hash_to_range(torch.tensor([x]), f, 9, c, 37))] for c in range(DIM // 2)])

    _check_against(module, _kjt(2), pooling, embed)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_qr_multiplies_per_id_before_pooling(pooling: str) -> None:
    opts = QrOptions(num_collisions=3, pooling=pooling, seed=9, remainder_init="uniform")
    module = QREmbeddingBagCollection(_ctx(), opts)
    q = module.ebc.embedding_bags["qr_quotient"].weight
    r = module.ebc.embedding_bags["qr_remainder"].weight
    assert q.shape[0] == sum(math.ceil(n / 3) for n in SIZES) and r.shape[0] == 3 * len(FEATURES)
    offsets = [sum(math.ceil(n / 3) for n in SIZES[:f]) for f in range(len(SIZES))]

    def embed(f: int, x: int) -> torch.Tensor:
        y = int(hash_to_range(torch.tensor([x]), f, 9, 0, SIZES[f]))
        return q[offsets[f] + y // 3] * r[3 * f + y % 3]

    kjt = _kjt(3)
    _check_against(module, kjt, pooling, embed)
    # padding the per-id KJT with empty bags (what the sharded module does) changes nothing
    with torch.no_grad():
        padded, aux = module.layout.expand(kjt, module.layout_buffers(), stride=kjt.values().numel() + 7)
        assert padded.stride() == kjt.values().numel() + 7
        torch.testing.assert_close(module.layout.finish(module.ebc(padded), aux).values(), module(kjt).values())
    empty = KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=torch.zeros(0, dtype=torch.int64),
                                                lengths=torch.zeros(6, dtype=torch.int64))
    assert torch.equal(module(empty).values(), torch.zeros(2, len(FEATURES) * DIM))


# ---- identity settings equal a plain EmbeddingBagCollection ----------------------------------------
def _plain_ebc(pooling: str) -> EmbeddingBagCollection:
    mode = PoolingType.MEAN if pooling == "mean" else PoolingType.SUM
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=n, feature_names=[f], pooling=mode)
        for f, n in zip(FEATURES, SIZES)
    ])


def _train_side_by_side(module: RemappedEmbeddingBagCollection, ebc: EmbeddingBagCollection,
                        trainable: List[nn.Parameter], gathers: Dict[str, Callable[[], torch.Tensor]]) -> None:
    """Same outputs for 3 SGD steps on raw ids mod n (the identity maps), and equal tables afterwards."""
    opt_a = torch.optim.SGD(trainable, lr=0.5)
    opt_b = torch.optim.SGD(ebc.parameters(), lr=0.5)
    sizes = torch.tensor(SIZES)
    for step in range(3):
        kjt = _kjt(10 + step, high=200)
        reduced = KeyedJaggedTensor(keys=FEATURES, lengths=kjt.lengths(), values=torch.remainder(
            kjt.values(), torch.repeat_interleave(sizes, torch.tensor(kjt.length_per_key()))))
        a, b = module(kjt), ebc(reduced)
        for f in FEATURES:
            torch.testing.assert_close(a[f], b[f], rtol=0, atol=1e-6)
        for opt, out in ((opt_a, a), (opt_b, b)):
            opt.zero_grad()
            (out.values() * torch.linspace(-1, 1, out.values().shape[1])).pow(2).sum().backward()
            opt.step()
    for f in FEATURES:
        torch.testing.assert_close(gathers[f](), ebc.embedding_bags[f"t_{f}"].weight, rtol=0, atol=1e-6)


def _copy_gathered(ebc: EmbeddingBagCollection, gathers: Dict[str, Callable[[], torch.Tensor]]) -> None:
    with torch.no_grad():
        for f in FEATURES:
            ebc.embedding_bags[f"t_{f}"].weight.copy_(gathers[f]())


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_identity_hash_equals_plain_ebc(pooling: str) -> None:
    module = HashedEmbeddingBagCollection(_ctx(), HashOptions(memory_fraction=1.0, hash="identity", pooling=pooling))
    ebc = _plain_ebc(pooling)
    gathers = {f: (lambda f=f: module.ebc.embedding_bags[f"hash_{f}"].weight) for f in FEATURES}
    _copy_gathered(ebc, gathers)
    _train_side_by_side(module, ebc, list(module.parameters()), gathers)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_identity_robe_equals_plain_ebc(pooling: str) -> None:
    """Identity chunk addresses lay the full tables out chunk by chunk (here in two feature groups)."""
    opts = RobeOptions(num_rows=2 * sum(SIZES), chunk_size=4, hash="identity", pooling=pooling,
                       feature_groups=[["f1"], ["f0", "f2"]])
    module = RobeEmbeddingBagCollection(_ctx(), opts)
    layout = module.layout
    offsets = layout.addresser.offsets  # type: ignore[attr-defined]

    def gather(f: int) -> torch.Tensor:
        table = module.ebc.embedding_bags[layout.table_name(layout.groups.group_of_feature[f])].weight
        return table[2 * offsets[f]: 2 * (offsets[f] + SIZES[f])].reshape(SIZES[f], DIM)

    gathers = {feature: (lambda f=f: gather(f)) for f, feature in enumerate(FEATURES)}
    ebc = _plain_ebc(pooling)
    _copy_gathered(ebc, gathers)
    _train_side_by_side(module, ebc, list(module.parameters()), gathers)
    with pytest.raises(ValueError, match=r"identity' needs at least 50 rows in group 0"):
        RobeEmbeddingBagCollection(_ctx(), RobeOptions(num_rows=100, chunk_size=4, hash="identity",
                                                       feature_groups=[["f1"], ["f0", "f2"]]))


def test_qr_with_one_collision_and_unit_remainders_equals_plain_ebc() -> None:
    module = QREmbeddingBagCollection(_ctx(), QrOptions(num_collisions=1, hash="identity", pooling="mean"))
    remainder = module.ebc.embedding_bags["qr_remainder"].weight
    assert torch.equal(remainder, torch.ones_like(remainder))  # remainder_init "ones"
    offsets = module.layout.quotient_offsets
    quotient = module.ebc.embedding_bags["qr_quotient"].weight
    gathers = {f: (lambda i=i: quotient[offsets[i]: offsets[i] + SIZES[i]]) for i, f in enumerate(FEATURES)}
    ebc = _plain_ebc("mean")
    _copy_gathered(ebc, gathers)
    _train_side_by_side(module, ebc, [quotient], gathers)  # remainders held at 1: the product is the identity


# ---- memory, registry, DLRM ---------------------------------------------------------------------
def test_memory_reports_every_table_and_buffer() -> None:
    cases = {
        "hash": (HashOptions(memory_fraction=0.2), sum(round(0.2 * n) for n in SIZES) * DIM),
        "robe": (RobeOptions(memory_fraction=0.25, chunk_size=4), round(0.25 * sum(SIZES) * DIM / 4) * 4),
        "qr": (QrOptions(), (sum(math.ceil(n / 4) for n in SIZES) + 4 * len(FEATURES)) * DIM),
    }
    for name, (opts, floats) in cases.items():
        spec = registry.get(name)
        module = spec.build(_ctx(), opts)
        report = spec.memory(module, _ctx(), opts, "adagrad")
        assert report.parameter_bytes == 4 * floats == report.optimizer_state_bytes, name
        assert report.buffer_bytes == sum(b.numel() * b.element_size() for b in module.buffers()) > 0, name
        assert report.full_table_bytes == sum(SIZES) * DIM * 4
        meta = spec.build(_ctx("meta"), opts)
        assert spec.memory(meta, _ctx("meta"), opts, "adagrad").as_dict() == report.as_dict(), name


@pytest.mark.parametrize("name,options", [
    ("hash", HashOptions()), ("robe", RobeOptions(chunk_size=4)), ("qr", QrOptions()),
])
def test_modules_drop_into_dlrm(name: str, options: object) -> None:
    module = registry.get(name).build(_ctx(), options)
    model = DLRM(embedding_bag_collection=module, dense_in_features=2,  # type: ignore[arg-type]
                 dense_arch_layer_sizes=[4, DIM], over_arch_layer_sizes=[4, 1])
    logits = model(torch.randn(5, 2), _kjt(4))
    assert logits.shape == (5, 1)
    logits.sum().backward()
    assert all(p.grad is not None for p in module.parameters())
