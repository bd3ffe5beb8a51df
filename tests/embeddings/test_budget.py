"""One byte budget per method, hot rows included: exact memory, rows of their own for hot ids, the tail path
unchanged by hot rows, and ``full`` over a vocabulary equal to a plain EmbeddingBagCollection."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings import registry
from embeddings.hashing_trick import HashLayout, HashOptions
from embeddings.hot_rows import HotSet
from embeddings.id_counts import FrequencyCounter, IdCounts
from embeddings.memrec.layout import PerTokenLayout
from embeddings.memrec.options import MemRecOptions
from embeddings.qr import QrLayout, QrOptions
from embeddings.chunk_table import ChunkLayout
from embeddings.robe import RobeOptions
from embeddings.types import SparseArchContext

FEATURES = ["f0", "f1", "f2", "f3"]
DIM = 8


def _ids(seed: int, n: int = 4000) -> List[np.ndarray]:
    """Zipf ids per feature (feature 3 has 30 values, the others thousands)."""
    rng = np.random.default_rng(seed)
    out = [rng.zipf(1.2, n).astype(np.int64) % m for m in (5000, 3000, 8000)]
    return out + [rng.integers(0, 30, n).astype(np.int64)]


def _counts() -> IdCounts:
    counter = FrequencyCounter(len(FEATURES))
    for f, ids in enumerate(_ids(0)):
        counter.add(f, ids)
    return counter.result(FEATURES)


def _ctx(counts: IdCounts, device: str = "cpu") -> SparseArchContext:
    return SparseArchContext(FEATURES, counts.table_sizes(), DIM, torch.device(device), id_counts=counts)


def _kjt(seed: int) -> KeyedJaggedTensor:
    ids = [v[:64] for v in _ids(seed)]
    ids[0][:5] = [-3, 2**40, 2**63 - 1, -(2**63), 123456789]  # never counted
    return KeyedJaggedTensor.from_lengths_sync(FEATURES, torch.from_numpy(np.concatenate(ids)),
                                               torch.ones(64 * len(FEATURES), dtype=torch.int32))


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


CASES: List[Tuple[str, Dict[str, Any]]] = [
    ("hash", {}), ("robe", {}), ("robe", {"chunk_size": 4, "feature_groups": [["f0", "f3"], ["f1", "f2"]]}),
    ("memrec", {"weight_init": "ones"}), ("memrec", {"num_token_hashes": 2, "num_weight_hashes": 2}),
    ("memrec", {"shared_tables": False}), ("qr", {}),
]


@pytest.mark.parametrize("method,extra", CASES)
@pytest.mark.parametrize("budget,hot_share", [(0.5, 0.0), (0.3, 0.5), (0.3, 0.9)])
def test_budget_is_met_exactly_and_hot_ids_own_their_rows(method: str, extra: Dict[str, Any], budget: float,
                                                          hot_share: float) -> None:
    counts = _counts()
    spec = registry.get(method)
    options = spec.options_type(budget=budget, hot_share=hot_share, **extra)
    if method == "qr" and hot_share > 0.8:  # QR's tables have a floor (~2 sqrt(F sum n) rows): an error, named
        with pytest.raises(ValueError, match="rows for QR, whose tables need at least"):
            spec.build(_ctx(counts), options)
        return
    module = spec.build(_ctx(counts), options)
    meta = spec.build(_ctx(counts, "meta"), options)
    report = spec.memory(module, _ctx(counts), options, "adagrad")
    limit = int(budget * sum(counts.table_sizes()) * DIM * 4)
    assert report.total_bytes == _module_bytes(module) == spec.memory(meta, _ctx(counts), options, "adagrad").total_bytes
    assert report.total_bytes <= limit
    if method == "qr":  # QR's size moves in steps of c: the smallest c that fits, i.e. c - 1 would not
        layout, c = module.layout, module.layout.options.num_collisions
        if c > 1:
            rows = lambda k: sum(-(-n // k) for n in layout.full_rows) + len(FEATURES) * k  # noqa: E731
            assert report.total_bytes + (rows(c - 1) - rows(c)) * DIM * 4 > limit
    else:
        assert 0.97 * limit <= report.total_bytes, (report.total_bytes, limit)
    hot_total = module.layout.hot.total
    assert (hot_total > 0) == (hot_share > 0)
    # every hot value of every feature, plus values never counted, through expand
    hot = module.layout.hot.hot
    values = [np.concatenate([v, _ids(7)[f][:50], [-5, 2**41]]) for f, v in enumerate(hot.values)]
    batch = max(len(v) for v in values)  # bags of one id each (empty bags pad the shorter features)
    lengths = torch.tensor([int(i < len(v)) for v in values for i in range(batch)], dtype=torch.int32)
    kjt = KeyedJaggedTensor.from_lengths_sync(FEATURES, torch.from_numpy(np.concatenate(values)), lengths)
    hot_mask = np.concatenate([np.isin(v, hot.values[f]) for f, v in enumerate(values)])
    rows = _rows_per_value(module, kjt)  # one tuple of (table, row) per raw id
    hot_rows = [r for r, h in zip(rows, hot_mask) if h]
    tail_rows = {x for r, h in zip(rows, hot_mask) if not h for x in r}
    hot_keys = {(f, v) for f, vs in enumerate(values) for v in vs if v in hot.values[f]}
    assert len({r for r in hot_rows}) == len(hot_keys) == hot_total  # distinct values, distinct rows
    assert not tail_rows & {x for r in hot_rows for x in r if not _shared_hot_scale(method, x)}


def _shared_hot_scale(method: str, row: Tuple[str, int]) -> bool:
    """QR's hot values share one remainder row (a learned scale), by design."""
    return method == "qr" and row[0] == "qr_remainder_ids"


def _rows_per_value(module: Any, kjt: KeyedJaggedTensor) -> List[Tuple[Tuple[str, int], ...]]:
    layout = module.layout
    with torch.no_grad():
        if isinstance(layout, PerTokenLayout):
            inner, _ = layout.expand(kjt, module.token_salts, module.weight_salts, module.hot_buffers())
        else:
            inner, _ = layout.expand(kjt, module.layout_buffers())
    per_key = inner.to_dict()
    n = kjt.values().numel()
    out: List[List[Tuple[str, int]]] = [[] for _ in range(n)]
    if isinstance(layout, QrLayout):
        for key in (layout.quotient_key, layout.remainder_key):
            for i, row in enumerate(per_key[key].values()[:n].tolist()):
                out[i].append((key, row))
        return [tuple(r) for r in out]
    if isinstance(layout, PerTokenLayout):  # (token row, weight row) pairs per id; every bag holds one id
        position = 0
        for f, name in enumerate(FEATURES):
            jt, raw = per_key[name], kjt[name].lengths().tolist()
            table = layout.token_table_name(name)
            for length, start, has_id in zip(jt.lengths().tolist(), jt.offsets()[:-1].tolist(), raw):
                if not has_id:
                    continue
                rows = jt.values()[start:start + length].tolist()
                weights = [int(w) + (0 if layout.options.shared_tables else f * layout.options.weight_rows)
                           for w in jt.weights()[start:start + length].tolist()]
                out[position] = [(table, r) for r in rows] + [("weights", w) for w in weights]
                position += 1
        return [tuple(r) for r in out]
    position = 0
    for name in FEATURES:  # hash: key = feature; chunk layouts: C chunk keys per feature
        keys = [k for k in per_key if k == name or k.startswith(f"{name}__c")]
        table_of = {c.name: c for c in layout.inner_configs()}
        table = next(t for t, c in table_of.items() if keys[0] in c.feature_names)
        count = per_key[keys[0]].values().numel()
        for i in range(count):
            out[position + i] = [(table, int(per_key[k].values()[i])) for k in keys]
        position += count
    return [tuple(r) for r in out]


@pytest.mark.parametrize("method", ["hash", "robe", "qr", "memrec"])
def test_tail_unchanged_by_hot_rows(method: str) -> None:
    """Ids that are not hot map to the same rows with or without hot rows; an empty hot set changes nothing."""
    counts = _counts()
    ctx = _ctx(counts)
    layouts = {
        "hash": lambda: HashLayout(ctx, HashOptions(num_rows=50, seed=3)),
        "robe": lambda: ChunkLayout(ctx, RobeOptions(num_rows=300, chunk_size=4, seed=3), "robe", "robe"),
        "qr": lambda: QrLayout(ctx, QrOptions(num_collisions=8, seed=3)),
        "memrec": lambda: PerTokenLayout(FEATURES, DIM, MemRecOptions(num_token_rows=99, num_token_hashes=2), "m"),
    }
    plain, empty, hot = layouts[method](), layouts[method](), layouts[method]()
    empty.set_hot(HotSet.empty(FEATURES))
    hot_set = HotSet.select(counts, FEATURES, num_rows=40, min_count=2)
    hot.set_hot(hot_set)
    kjt = _kjt(5)
    outs = [_expand(layout, kjt) for layout in (plain, empty, hot)]
    assert _same(outs[0], outs[1])
    values = kjt.values()
    is_hot = torch.from_numpy(np.concatenate([np.isin(kjt[f].values().numpy(), hot_set.values[i])
                                              for i, f in enumerate(FEATURES)]))
    assert 0 < int(is_hot.sum()) < values.numel()
    per_id_plain, per_id_hot = _per_id(plain, outs[0], values.numel()), _per_id(hot, outs[2], values.numel())
    for i in torch.nonzero(~is_hot).flatten().tolist():
        assert per_id_plain[i] == per_id_hot[i]
    for i in torch.nonzero(is_hot).flatten().tolist():
        assert per_id_plain[i] != per_id_hot[i]


def _expand(layout: Any, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    with torch.no_grad():
        if isinstance(layout, PerTokenLayout):
            salts = layout.salts()
            return layout.expand(kjt, *salts, layout.hot.buffers(torch.device("cpu")))[0]
        buffers = layout.all_buffers(torch.device("cpu"))
        return layout.expand(kjt, buffers)[0]


def _per_id(layout: Any, inner: KeyedJaggedTensor, n: int) -> List[Tuple[int, ...]]:
    """The rows (and weights) each raw id was expanded to, in id order."""
    if isinstance(layout, QrLayout):
        d = inner.to_dict()
        return list(zip(d[layout.quotient_key].values()[:n].tolist(), d[layout.remainder_key].values()[:n].tolist()))
    out: List[Tuple[int, ...]] = []
    for f in FEATURES:
        keys = [k for k in inner.keys() if k == f or k.startswith(f"{f}__c")]
        jts = [inner[k] for k in keys]
        for b, length in enumerate(jts[0].lengths().tolist()):
            start = int(jts[0].offsets()[b])
            row: Tuple[int, ...] = tuple(v for jt in jts for v in jt.values()[start:start + length].tolist())
            if jts[0].weights_or_none() is not None:
                row += tuple(int(w) for w in jts[0].weights()[start:start + length].tolist())
            out.append(row)
    return out


def _same(a: KeyedJaggedTensor, b: KeyedJaggedTensor) -> bool:
    same = a.keys() == b.keys() and torch.equal(a.values(), b.values()) and torch.equal(a.lengths(), b.lengths())
    if a.weights_or_none() is not None:
        same = same and torch.equal(a.weights(), b.weights())
    return same


def test_full_vocabulary_equals_a_plain_ebc_over_contiguous_ids() -> None:
    """Every counted value its own row (value v of feature f -> row 1 + rank), unseen values row 0: with
    contiguous ids 0..n-1 that is a plain EmbeddingBagCollection over ``id + 1``."""
    sizes = [7, 4, 9, 3]
    counter = FrequencyCounter(len(FEATURES))
    for f, n in enumerate(sizes):
        counter.add(f, np.arange(n))
    counts = counter.result(FEATURES)
    spec = registry.get("full")
    options = spec.options_type(ids="vocabulary", pooling="mean")
    assert spec.id_mode(options) == "raw" and spec.id_mode(spec.options_type()) == "table"
    module = spec.build(_ctx(counts), options)
    assert [c.num_embeddings for c in module.layout.inner_configs()] == [n + 1 for n in sizes]
    plain = EmbeddingBagCollection([EmbeddingBagConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=n + 1,
                                                       feature_names=[f], pooling=module.layout.inner_configs()[0].pooling)
                                    for f, n in zip(FEATURES, sizes)])
    plain.load_state_dict(module.ebc.state_dict())
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 3, (len(FEATURES) * 6,), generator=gen)
    ids = torch.cat([torch.randint(0, sizes[f], (int(lengths.view(4, 6)[f].sum()),), generator=gen) for f in range(4)])
    got = module(KeyedJaggedTensor.from_lengths_sync(FEATURES, ids, lengths)).to_dict()
    want = plain(KeyedJaggedTensor.from_lengths_sync(FEATURES, ids + 1, lengths)).to_dict()
    for f in FEATURES:
        torch.testing.assert_close(got[f], want[f])
    unseen = KeyedJaggedTensor.from_lengths_sync(FEATURES, torch.tensor([100, -1, 2**40, 50]), torch.ones(4, dtype=torch.int64))
    zeros = KeyedJaggedTensor.from_lengths_sync(FEATURES, torch.zeros(4, dtype=torch.int64), torch.ones(4, dtype=torch.int64))
    got = module(unseen).to_dict()
    want = plain(zeros).to_dict()
    for f in FEATURES:
        torch.testing.assert_close(got[f], want[f])


@pytest.mark.parametrize("method,options,message", [
    ("hash", {"hot_share": 0.5}, "needs embeddings.options.budget"),
    ("robe", {"budget": 0.1, "memory_fraction": 0.1}, "not both"),
    ("memrec", {"budget": 0.1, "num_token_rows": 10}, "not both"),
    ("memrec", {"budget": 0.1, "hot_share": 0.5, "granularity": "per_sample"}, "per_token"),
    ("hash", {"budget": 0.1, "hot_share": 1.0}, r"\[0, 1\)"),
    ("robe", {"budget": 0.1, "hot_share": 0.2, "hash": "identity"}, "no hot rows"),
])
def test_bad_budget_options_are_named(method: str, options: Dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        registry.get(method).options_type(**options)


def test_too_small_budgets_and_missing_counts_are_clear_errors() -> None:
    counts = _counts()
    with pytest.raises(ValueError, match="raise the budget"):
        registry.get("qr").build(_ctx(counts), QrOptions(budget=0.001))
    with pytest.raises(ValueError, match="raise the budget|fewer than"):
        registry.get("hash").build(_ctx(counts), HashOptions(budget=0.0005))
    ctx = SparseArchContext(FEATURES, counts.table_sizes(), DIM, torch.device("cpu"))
    with pytest.raises(ValueError, match="compactrec prepare"):
        registry.get("robe").build(ctx, RobeOptions(budget=0.1, hot_share=0.5))
