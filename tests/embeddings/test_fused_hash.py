"""The optional fused hashing kernel (``hash_backend: fused``): the same bits as the torch path on the pinned
golden values, on random and extreme int64 ids, for every modulus form and every hashed method; automatic,
logged fallback where it cannot run (no compiler, CUDA, meta)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings import fused_hash
from embeddings.chunked import wrap_of
from embeddings.hashing import hash_salt, hash_to_range, salted_hash
from embeddings.hashing_trick import HashedEmbeddingBagCollection, HashOptions
from embeddings.memrec_module import MemRecEmbeddingBagCollection
from embeddings.memrec_options import MemRecOptions
from embeddings.memrec_per_sample import MemRecPerSampleEmbeddingBag
from embeddings.qr import QREmbeddingBagCollection, QrOptions
from embeddings.robe import RobeEmbeddingBagCollection, RobeOptions
from embeddings.types import SparseArchContext
from tests.embeddings.test_hashing import GOLDEN, IDS, _py_hash_to_range


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The kernel built into a fresh cache directory; the whole module skips if it cannot be built."""
    mp = pytest.MonkeyPatch()
    mp.setenv("COMPACTREC_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernels")))
    mp.delenv("COMPACTREC_FUSED_HASH", raising=False)
    fused_hash.reset()
    if not fused_hash.available():
        mp.undo()
        fused_hash.reset()
        pytest.skip("fused hash kernel unavailable: no working C compiler (cc/gcc/clang) on this machine")
    yield
    mp.undo()
    fused_hash.reset()


def _random_ids(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-(2**63), 2**63 - 1, (n,), generator=gen, dtype=torch.int64)
    ids[: n // 4] = torch.randint(-(2**40), 2**40, (n // 4,), generator=gen)  # around 2**32
    ids[n // 4: n // 2] = torch.randint(-1000, 1000, (n // 2 - n // 4,), generator=gen)
    extremes = torch.tensor(IDS, dtype=torch.int64)
    return torch.cat([extremes, ids])


# ---- the kernel against the pinned values and the torch path ------------------------------------------
@pytest.mark.parametrize("args,expected", GOLDEN)
def test_golden_values(kernel: None, args: tuple, expected: int) -> None:
    x, feature, seed, k, n = args
    salts = hash_salt(torch.tensor([[0]]), seed, k) if feature == 0 else hash_salt(
        torch.arange(feature + 1)[:, None], seed, k)
    out = fused_hash.salted_hash(torch.tensor([x]), torch.tensor([feature]), salts, n)
    assert out is not None and out.shape == (1, 1) and int(out[0, 0]) == expected
    assert int(out[0, 0]) == int(hash_to_range(torch.tensor([x]), feature, seed, k, n)[0])


@pytest.mark.parametrize("num_buckets", [1, 2, 3, 10, 97, 75000, 1000003, 2**31 + 11, 2**32, 2**33 + 1,
                                         2**61 - 1, 2**62 - 1, 2**62])
@pytest.mark.parametrize("h", [1, 3])
def test_scalar_modulus_matches_torch(kernel: None, num_buckets: int, h: int) -> None:
    ids = _random_ids(5000, num_buckets % 1000)
    num_features = 7
    feature = torch.randint(0, num_features, (ids.numel(),), generator=torch.Generator().manual_seed(1))
    salts = hash_salt(torch.arange(num_features)[:, None], 12345, torch.arange(h)[None, :])
    want = salted_hash(ids, feature, salts, num_buckets=num_buckets, backend="torch")
    got = salted_hash(ids, feature, salts, num_buckets=num_buckets, backend="fused")
    assert got.dtype == torch.int64 and torch.equal(got, want)
    head = got[: len(IDS)].tolist()  # the extreme ids, against the independent pure-Python reference
    assert head == [[_py_hash_to_range(x, int(f), 12345, j, num_buckets) for j in range(h)]
                    for x, f in zip(IDS, feature.tolist())]


@pytest.mark.parametrize("salt_dims", [1, 2])
def test_per_feature_moduli_and_raw_hash_match_torch(kernel: None, salt_dims: int) -> None:
    rows = [1, 2, 7, 64, 75000, 2**31 + 11, 2**40 + 3, 2**62]
    ids = _random_ids(40_000, 7)  # large enough for the multi-threaded split
    feature = torch.randint(0, len(rows), (ids.numel(),), generator=torch.Generator().manual_seed(2))
    fidx = torch.arange(len(rows))
    salts = hash_salt(fidx, 3, 0) if salt_dims == 1 else hash_salt(fidx[:, None], 3, torch.arange(4)[None, :])
    rows_t, wrap_t = torch.tensor(rows), torch.tensor(wrap_of(rows))
    for kw in (dict(rows=rows_t, wrap=wrap_t), dict()):
        want = salted_hash(ids, feature, salts, backend="torch", **kw)
        got = salted_hash(ids, feature, salts, backend="fused", **kw)
        assert got.shape == want.shape and torch.equal(got, want)


def test_thread_split_is_exact_for_any_thread_count(kernel: None) -> None:
    ids = _random_ids(100_003, 11)
    feature = torch.zeros_like(ids)
    salts = hash_salt(torch.zeros(1, 1, dtype=torch.int64), 0, torch.zeros(1, 1, dtype=torch.int64))
    want = salted_hash(ids, feature, salts, num_buckets=75000, backend="torch")
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert torch.equal(salted_hash(ids, feature, salts, num_buckets=75000, backend="fused"), want)
    finally:
        torch.set_num_threads(threads)


def test_empty_and_int32_inputs(kernel: None) -> None:
    salts = hash_salt(torch.arange(2)[:, None], 0, torch.zeros(1, 1, dtype=torch.int64))
    empty = torch.empty(0, dtype=torch.int64)
    assert salted_hash(empty, empty, salts, num_buckets=5, backend="fused").shape == (0, 1)
    small = torch.arange(-50, 50, dtype=torch.int32)
    feature = (torch.arange(100) % 2).to(torch.int32)
    assert torch.equal(salted_hash(small, feature, salts, num_buckets=77, backend="fused"),
                       salted_hash(small.long(), feature.long(), salts, num_buckets=77, backend="torch"))


# ---- every hashed method: identical mapped ids with either backend ------------------------------------
FEATURES = ["f0", "f1", "f2"]
SIZES = [40, 25, 60]


def _kjt(seed: int, batch: int = 64) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(FEATURES) * batch,), generator=gen)
    values = torch.randint(-(2**62), 2**62, (int(lengths.sum()),), generator=gen)
    return KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=values, lengths=lengths)


def _ctx() -> SparseArchContext:
    return SparseArchContext(FEATURES, SIZES, 8, torch.device("cpu"))


def _same_kjt(a: KeyedJaggedTensor, b: KeyedJaggedTensor) -> None:
    assert a.keys() == b.keys() and torch.equal(a.lengths(), b.lengths()) and torch.equal(a.values(), b.values())
    assert (a.weights_or_none() is None) == (b.weights_or_none() is None)
    if a.weights_or_none() is not None:
        assert torch.equal(a.weights(), b.weights())


@pytest.mark.parametrize("module_type,options", [
    (HashedEmbeddingBagCollection, dict(memory_fraction=0.5)),
    (RobeEmbeddingBagCollection, dict(num_rows=37, chunk_size=4)),
    (QREmbeddingBagCollection, dict(num_collisions=3)),
])
def test_remapped_methods_map_ids_identically(kernel: None, module_type: type, options: dict) -> None:
    opts_type = {HashedEmbeddingBagCollection: HashOptions, RobeEmbeddingBagCollection: RobeOptions,
                 QREmbeddingBagCollection: QrOptions}[module_type]
    torch_mod = module_type(_ctx(), opts_type(**options))
    fused_mod = module_type(_ctx(), opts_type(**options, hash_backend="fused"))
    fused_mod.load_state_dict(torch_mod.state_dict())
    for seed in range(3):
        kjt = _kjt(seed)
        a, _ = torch_mod.layout.expand(kjt, torch_mod.layout_buffers())
        b, _ = fused_mod.layout.expand(kjt, fused_mod.layout_buffers())
        _same_kjt(a, b)
        assert torch.equal(torch_mod(kjt).values(), fused_mod(kjt).values())


@pytest.mark.parametrize("granularity", ["per_token", "per_sample"])
def test_memrec_maps_ids_identically(kernel: None, granularity: str) -> None:
    module_type = MemRecEmbeddingBagCollection if granularity == "per_token" else MemRecPerSampleEmbeddingBag
    base = dict(num_token_rows=97, num_weight_rows=31, num_token_hashes=2, num_weight_hashes=2, seed=5,
                granularity=granularity)
    torch_mod = module_type(FEATURES, 8, MemRecOptions(**base))
    fused_mod = module_type(FEATURES, 8, MemRecOptions(**base, hash_backend="fused"))
    fused_mod.load_state_dict(torch_mod.state_dict())
    for seed in range(3):
        kjt = _kjt(seed)
        a, _ = torch_mod.layout.expand(kjt, torch_mod.token_salts, torch_mod.weight_salts)
        b, _ = fused_mod.layout.expand(kjt, fused_mod.token_salts, fused_mod.weight_salts)
        _same_kjt(a, b)
        assert torch.equal(torch_mod(kjt).values(), fused_mod(kjt).values())


# ---- fallback ------------------------------------------------------------------------------------------
def test_no_compiler_falls_back_to_torch_and_logs_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Runs with or without a compiler: a build that cannot find one returns None; the backend still works."""
    monkeypatch.setenv("COMPACTREC_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(fused_hash, "_compiler", lambda: None)
    fused_hash.reset()
    try:
        ids = torch.tensor(IDS)
        feature = torch.zeros_like(ids)
        salts = hash_salt(torch.zeros(1, 1, dtype=torch.int64), 0, torch.zeros(1, 1, dtype=torch.int64))
        with caplog.at_level(logging.WARNING, logger="embeddings.fused_hash"):
            assert fused_hash.salted_hash(ids, feature, salts, 10) is None
            got = salted_hash(ids, feature, salts, num_buckets=10, backend="fused")
        assert torch.equal(got, salted_hash(ids, feature, salts, num_buckets=10, backend="torch"))
        warnings = [r for r in caplog.records if "falling back to the torch ops" in r.getMessage()]
        assert len(warnings) == 1 and "no C compiler" in warnings[0].getMessage()
    finally:
        fused_hash.reset()


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPACTREC_FUSED_HASH", "0")
    fused_hash.reset()
    try:
        assert not fused_hash.available()
    finally:
        fused_hash.reset()


def test_meta_tensors_take_the_torch_path() -> None:
    ids = torch.empty(10, dtype=torch.int64, device="meta")
    salts = torch.empty(3, 2, dtype=torch.int64, device="meta")
    assert fused_hash.salted_hash(ids, ids, salts, 5) is None
    assert salted_hash(ids, ids, salts, num_buckets=5, backend="fused").shape == (10, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_use_the_torch_path_with_the_same_bits() -> None:
    ids = _random_ids(10_000, 3)
    feature = torch.randint(0, 5, (ids.numel(),), generator=torch.Generator().manual_seed(0))
    salts = hash_salt(torch.arange(5)[:, None], 1, torch.arange(2)[None, :])
    want = salted_hash(ids, feature, salts, num_buckets=75000, backend="torch")
    got = salted_hash(ids.cuda(), feature.cuda(), salts.cuda(), num_buckets=75000, backend="fused")
    assert got.is_cuda and torch.equal(got.cpu(), want)
