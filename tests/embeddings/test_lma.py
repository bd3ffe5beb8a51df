"""Single-process LMA: options, the index artifact (round trip, versions, mismatches), the module against its
definition, degenerate settings, memory accounting and the meta (planning) path."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings import registry
from embeddings.hashing import hash_to_range
from embeddings.lma import SPEC, LmaEmbeddingBagCollection, LmaOptions
from embeddings.lma_index import FORMAT, VERSION, IndexHeader, LmaIndex, load_index, read_header, save_index
from embeddings.lma_minhash import KEY_SEED, SignatureAccumulator, chunk_addresses, row_ranks, value_keys
from embeddings.types import SparseArchContext

FEATURES = ["f0", "f1", "f2"]
SIZES = [40, 25, 60]
DIM = 8


def write_synthetic_index(path: Path, features: Sequence[str] = tuple(FEATURES), seed: int = 3, num_chunks: int = 2,
                          num_hashes: int = 2, ids: int = 20, rows: int = 64) -> LmaIndex:
    """An index over ids 0..ids-1 of every feature with planted sharing: (f, x) and (f, x + ids/2) have the
    same semantic set, and so do (f0, x) and (f1, x)."""
    gen = np.random.default_rng(0)
    base = {x: gen.choice(rows, size=int(gen.integers(1, 8)), replace=False) for x in range(ids // 2)}
    acc = SignatureAccumulator(row_ranks(rows, num_chunks * num_hashes, seed), max_pairs=7)
    for f in range(len(features)):
        for x in range(ids):
            members = base[x % (ids // 2)] if f < 2 else gen.choice(rows, size=3, replace=False)
            key = value_keys(torch.tensor([x]), torch.tensor([f])).numpy()
            acc.add(np.repeat(key, len(members)), members, np.full(len(members), f))
    sig = acc.result()
    header = IndexHeader(seed=seed, num_chunks=num_chunks, num_hashes=num_hashes, key_seed=KEY_SEED,
                         feature_names=list(features), rows_sampled=rows, rows_available=rows,
                         values_seen=len(sig), values_covered=len(sig), min_count=1, sample_rows=rows)
    index = LmaIndex(header, sig.keys, sig.signatures, sig.features, sig.counts)
    save_index(index, path)
    return index


def _ctx(device: str = "cpu") -> SparseArchContext:
    return SparseArchContext(FEATURES, SIZES, DIM, torch.device(device), pooling_factors=[1.5, 1.5, 1.5])


def _batch(seed: int = 0, batch: int = 5) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(FEATURES) * batch,), generator=gen)
    values = torch.randint(-(2**40), 2**40, (int(lengths.sum()),), generator=gen)
    values[::2] = torch.randint(0, 20, values[::2].shape, generator=gen)
    return KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=values, lengths=lengths)


@pytest.fixture
def index_path(tmp_path: Path) -> Path:
    path = tmp_path / "index.npz"
    write_synthetic_index(path)
    return path


def _module(path: Path, **kw: object) -> LmaEmbeddingBagCollection:
    opts: Dict[str, object] = dict(num_rows=50, chunk_size=4, num_hashes=2, seed=3, index_path=str(path))
    opts.update(kw)
    return LmaEmbeddingBagCollection(_ctx(), LmaOptions(**opts))  # type: ignore[arg-type]


# ---- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,error", [
    ("num_hashes", 0, ValueError), ("num_hashes", 1.5, TypeError), ("chunk_size", 0, ValueError),
    ("memory_fraction", -0.5, ValueError), ("num_rows", 0, ValueError), ("sample_rows", 0, ValueError),
    ("min_count", 0, ValueError), ("pooling", "max", ValueError), ("seed", -1, ValueError),
    ("index_path", "", ValueError),
])
def test_options_reject_bad_values_naming_field(field: str, value: object, error: type) -> None:
    with pytest.raises(error, match=rf"embeddings\.options\.{field}"):
        LmaOptions(**{field: value})  # type: ignore[arg-type]


def test_options_need_one_memory_size_and_a_dividing_chunk(index_path: Path) -> None:
    with pytest.raises(ValueError, match="memory_fraction.*num_rows.*not both"):
        LmaOptions(memory_fraction=0.1, num_rows=10)
    with pytest.raises(ValueError, match=r"chunk_size=3 must divide model.embedding_dim=8"):
        _module(index_path, chunk_size=3)
    with pytest.raises(ValueError, match="feature_groups.*unknown feature 'nope'"):
        _module(index_path, feature_groups=[["f0", "nope"]])
    with pytest.raises(ValueError, match="feature_groups.*no group"):
        _module(index_path, feature_groups=[["f0"], ["f1"]])


def test_missing_index_errors_name_the_build_command(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"index_path is not set.*compactrec prepare CONFIG"):
        LmaEmbeddingBagCollection(_ctx(), LmaOptions())
    with pytest.raises(FileNotFoundError, match=r"does not exist.*compactrec prepare CONFIG"):
        _module(tmp_path / "absent.npz")


# ---- artifact -----------------------------------------------------------------------------------
def test_index_round_trip_and_header_only_read(index_path: Path) -> None:
    index = load_index(index_path)
    again = load_index(index_path)
    assert index.header == again.header == read_header(index_path)
    assert index.header.format == FORMAT and index.header.version == VERSION
    for name in ("keys", "signatures", "features", "counts"):
        np.testing.assert_array_equal(getattr(index, name), getattr(again, name))
    assert index.keys.dtype == np.int64 and bool(np.all(np.diff(index.keys) > 0))
    assert index.signatures.shape == (60, 4) and index.signatures.dtype == np.int32
    with np.load(index_path, allow_pickle=False) as raw:  # a plain npz with a JSON header
        assert json.loads(str(raw["header"]))["values_covered"] == 60


def _rewrite_header(path: Path, **changes: Any) -> None:
    index = load_index(path)
    save_index(dataclasses.replace(index, header=dataclasses.replace(index.header, **changes)), path)


@pytest.mark.parametrize("change,message", [
    ({"seed": 4}, r"seed: index has 4, the config gives 3"),
    ({"num_hashes": 1, "num_chunks": 4}, r"num_chunks: index has 4.*num_hashes: index has 1"),
    ({"feature_names": ["f0", "f1", "g2"]}, r"feature_names"),
    ({"key_seed": 1}, r"key_seed"),
])
def test_index_that_does_not_match_the_config_is_rejected(index_path: Path, change: Dict[str, object],
                                                          message: str) -> None:
    _rewrite_header(index_path, **change)
    with pytest.raises(ValueError, match=message + r".*Rebuild it with `compactrec prepare CONFIG"):
        _module(index_path)


def test_other_format_versions_and_files_are_rejected(index_path: Path, tmp_path: Path) -> None:
    index = load_index(index_path)
    _rewrite_header(index_path, version=1)
    with pytest.raises(ValueError, match=rf"format version 1, this code reads version {VERSION}; rebuild"):
        read_header(index_path)
    save_index(dataclasses.replace(index, header=dataclasses.replace(index.header, format="other")), index_path)
    with pytest.raises(ValueError, match="is not 'compactrec-lma-index'"):
        read_header(index_path)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not an LMA index"):
        read_header(junk)
    with pytest.raises(ValueError, match="strictly increasing"):
        LmaIndex(index.header, index.keys[::-1].copy(), index.signatures, index.features, index.counts)


# ---- the module against its definition ----------------------------------------------------------
def _reference(module: LmaEmbeddingBagCollection, index: LmaIndex, kjt: KeyedJaggedTensor) -> Dict[str, torch.Tensor]:
    """Chunk c of (f, x): the indexed rows from the signatures, else hash_to_range(x, f, seed, c, rows)."""
    layout = module.layout
    o = layout.options
    table = module.ebc.embedding_bags[layout.table_name(0)].weight
    rows = layout.rows_per_group[0]
    lookup = {int(k): i for i, k in enumerate(index.keys)}
    out: Dict[str, torch.Tensor] = {}
    for f, feature in enumerate(FEATURES):
        bags = []
        for ids in kjt[feature].to_dense():
            pooled = torch.zeros(DIM)
            for x in ids.tolist():
                key = int(value_keys(torch.tensor([x]), torch.tensor([f]))[0])
                if key in lookup:
                    sig = torch.from_numpy(index.signatures[lookup[key]][None, :])
                    chunk_rows = chunk_addresses(sig, o.num_hashes, o.seed, torch.tensor([rows]),
                                                 torch.tensor([(1 << 64) % rows]))[0].tolist()
                else:
                    chunk_rows = [int(hash_to_range(torch.tensor([x]), f, o.seed, c, rows)) for c in range(2)]
                pooled = pooled + torch.cat([table[r] for r in chunk_rows])
            bags.append(pooled / max(1, len(ids)) if o.pooling == "mean" else pooled)
        out[feature] = torch.stack(bags)
    return out


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_forward_matches_the_definition(index_path: Path, pooling: str) -> None:
    module = _module(index_path, pooling=pooling)
    index = load_index(index_path)
    kjt = _batch()
    got = module(kjt)
    assert got.keys() == FEATURES and got.values().shape == (5, 3 * DIM)
    want = _reference(module, index, kjt)
    for f in FEATURES:
        torch.testing.assert_close(got[f], want[f], rtol=0, atol=1e-6)


def test_planted_sharing_shows_in_the_embeddings(index_path: Path) -> None:
    """Equal semantic sets -> identical embeddings (within and across features); unindexed ids differ."""
    module = _module(index_path, num_rows=1000)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=torch.tensor([3, 13, 3, 2**40, 3, 13]),
                                              lengths=torch.tensor([1, 1, 1, 1, 1, 1]))
    out = module(kjt)
    torch.testing.assert_close(out["f0"][0], out["f0"][1])  # (f0, 3) and (f0, 13)
    torch.testing.assert_close(out["f0"][0], out["f1"][0])  # (f0, 3) and (f1, 3)
    assert not torch.equal(out["f1"][0], out["f1"][1])  # an unindexed id: random chunks
    assert not torch.equal(out["f2"][0], out["f2"][1])  # f2 has independent sets


def test_element_level_reference_path_uses_one_float_chunks(tmp_path: Path) -> None:
    path = tmp_path / "z1.npz"
    write_synthetic_index(path, num_chunks=DIM, num_hashes=1)
    module = _module(path, chunk_size=1, num_hashes=1, num_rows=400)
    assert module.layout.num_chunks == DIM and module.ebc.embedding_bags["lma_memory"].weight.shape == (400, 1)
    out = module(_batch())
    assert out.values().shape == (5, 3 * DIM)
    with pytest.raises(ValueError, match="multiples of 4"):
        module.layout.check_shardable()


def test_without_sharing_it_is_an_embedding_bag_collection_over_gathered_rows(index_path: Path) -> None:
    """Large memory: values share rows exactly where their signatures agree (no random collisions), and LMA
    equals an EBC whose rows are each value's gathered chunks."""
    module = _module(index_path, num_rows=10**6, pooling="mean")
    index = load_index(index_path)
    keys, rows = module.layout.addresser.index_rows(module.layout)  # type: ignore[attr-defined]
    distinct = {tuple(r) for r in rows.tolist()}
    sets = {tuple(s) for s in index.signatures.tolist()}
    assert len(distinct) == len(sets)  # rows differ exactly where signatures differ (no random collision)
    table = module.ebc.embedding_bags["lma_memory"].weight
    ids = torch.arange(20)
    ebc_tables = []
    for f, feature in enumerate(FEATURES):
        position = torch.searchsorted(keys, value_keys(ids, torch.full_like(ids, f)))
        gathered = table.detach()[rows[position].long()].reshape(20, DIM)
        config = EmbeddingBagConfig(name=f"t_{feature}", embedding_dim=DIM, num_embeddings=20,
                                    feature_names=[feature], pooling=PoolingType.MEAN)
        ebc_tables.append((config, gathered))
    ebc = EmbeddingBagCollection(tables=[c for c, _ in ebc_tables])
    for config, gathered in ebc_tables:
        ebc.embedding_bags[config.name].weight.data.copy_(gathered)
    lengths = torch.tensor([1, 2, 0, 3, 1, 1])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=torch.tensor([1, 4, 2, 5, 6, 7, 8, 9]),
                                              lengths=lengths)
    a, b = module(kjt), ebc(kjt)
    for feature in FEATURES:
        torch.testing.assert_close(a[feature], b[feature], rtol=0, atol=1e-7)


# ---- memory and planning ------------------------------------------------------------------------
def test_memory_counts_the_dictionary_byte_for_byte(index_path: Path) -> None:
    module = _module(index_path, num_rows=50)
    report = SPEC.memory(module, _ctx(), module.layout.options, "adagrad")  # type: ignore[arg-type]
    by_name = {t.name: t for t in report.tables}
    assert by_name["lma_memory"].bytes == 50 * 4 * 4 and by_name["lma_memory"].kind == "parameter"
    assert by_name["lma_index_keys"].bytes == 60 * 8 and by_name["lma_index_rows"].bytes == 60 * 2 * 4
    assert report.buffer_bytes == sum(b.numel() * b.element_size() for b in module.buffers())
    assert report.optimizer_state_bytes == 50 * 4 * 4
    assert report.full_table_bytes == sum(SIZES) * DIM * 4


def test_meta_build_reads_only_the_header_and_sizes_buffers(index_path: Path) -> None:
    opts = LmaOptions(memory_fraction=0.25, chunk_size=4, seed=3, index_path=str(index_path))
    module = LmaEmbeddingBagCollection(_ctx("meta"), opts)
    assert module.lma_index_keys.is_meta and module.lma_index_rows.shape == (60, 2)
    assert module.ebc.embedding_bags["lma_memory"].weight.shape == (round(0.25 * sum(SIZES) * DIM / 4), 4)
    cpu = SPEC.memory(LmaEmbeddingBagCollection(_ctx(), opts), _ctx(), opts, "sgd")
    assert SPEC.memory(module, _ctx("meta"), opts, "sgd").as_dict() == cpu.as_dict()


def test_registered_spec_builds_from_strict_options(index_path: Path) -> None:
    spec = registry.get("lma")
    assert spec.options_type is LmaOptions and spec.ids == "raw"
    module = spec.build(_ctx(), LmaOptions(num_rows=30, chunk_size=4, seed=3, index_path=str(index_path)))
    assert [c.feature_names for c in module.embedding_bag_configs()] == [FEATURES]  # type: ignore[operator]
    assert module.embedding_bag_configs()[0].embedding_dim == DIM  # type: ignore[operator]
