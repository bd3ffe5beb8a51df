"""The hashing operator ``compactrec::salted_hash`` (``hash_backend: fused``): the same bits as the torch path on
the pinned golden values, on random and extreme int64 ids, for every modulus form and every hashed method,
eagerly, scripted (TorchScript) and exported (``torch.export``); the torch-ops kernel as the logged fallback where
the C++ kernel cannot be built (no compiler, disabled), and on meta tensors (shapes only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.ops import salted_hash as fused_hash
from embeddings.remap import wrap_of
from embeddings.hashing import hash_salt, hash_to_range
from embeddings.id_hash import salted_hash
from embeddings.hashing_trick import HashedEmbeddingBagCollection, HashOptions
from embeddings.memrec.module import MemRecEmbeddingBagCollection
from embeddings.memrec.options import MemRecOptions
from embeddings.memrec.per_sample import MemRecPerSampleEmbeddingBag
from embeddings.qr import QREmbeddingBagCollection, QrOptions
from embeddings.robe import RobeEmbeddingBagCollection, RobeOptions
from embeddings.types import SparseArchContext
from tests.embeddings.test_hashing import GOLDEN, IDS, _py_hash_to_range


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kernel() -> Iterator[None]:
    """The C++ kernel, built into (or reused from) the user's kernel cache; the module skips without it."""
    if not fused_hash.available():
        pytest.skip("compactrec::salted_hash C++ kernel unavailable here (no C++ compiler or ninja): "
                    "the torch-ops kernel runs instead")
    yield


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


# ---- scripted and exported models call the operator ---------------------------------------------------------
class _HashRows(torch.nn.Module):
    """What a hashed method's id maths does: rows of every id from the operator (per-feature moduli)."""

    def forward(self, values: torch.Tensor, feature: torch.Tensor, salts: torch.Tensor,
                rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.compactrec.salted_hash(values, feature, salts, rows)


def _golden_inputs() -> tuple:
    """The pinned golden cases as one batch: (ids, features, salts [F, 1] per case, moduli [F], expected)."""
    ids = torch.tensor([args[0] for args, _ in GOLDEN])
    salts = torch.cat([hash_salt(torch.tensor([[args[1]]]), args[2], args[3]) for args, _ in GOLDEN])
    rows = torch.tensor([args[4] for args, _ in GOLDEN])
    return ids, torch.arange(len(GOLDEN)), salts, rows, torch.tensor([[want] for _, want in GOLDEN])


def test_golden_values_eager_scripted_and_exported(kernel: None, tmp_path: Path) -> None:
    ids, feature, salts, rows, want = _golden_inputs()
    module = _HashRows()
    assert torch.equal(module(ids, feature, salts, rows), want)
    scripted = torch.jit.script(module)
    scripted.save(str(tmp_path / "hash.pt"))
    assert torch.equal(torch.jit.load(str(tmp_path / "hash.pt"))(ids, feature, salts, rows), want)
    n = torch.export.Dim("n", min=2)
    exported = torch.export.export(module, (ids, feature, salts, rows), dynamic_shapes=({0: n}, {0: n}, None, None))
    torch.export.save(exported, tmp_path / "hash.pt2")
    loaded = torch.export.load(tmp_path / "hash.pt2").module()
    assert torch.equal(loaded(ids, feature, salts, rows), want)
    # another batch size through the same exported graph, against the torch path
    more = _random_ids(3000, 5)
    f = torch.randint(0, len(GOLDEN), (more.numel(),), generator=torch.Generator().manual_seed(3))
    expected = salted_hash(more, f, salts, rows=rows, wrap=torch.tensor(wrap_of(rows.tolist())), backend="torch")
    assert torch.equal(loaded(more, f, salts, rows), expected)
    assert torch.equal(torch.jit.load(str(tmp_path / "hash.pt"))(more, f, salts, rows), expected)


def test_bad_inputs_are_clear_errors(kernel: None) -> None:
    salts = hash_salt(torch.arange(3)[:, None], 0, torch.zeros(1, 1, dtype=torch.int64))
    ids = torch.arange(10)
    with pytest.raises(RuntimeError, match=r"feature\[4\] = 7 is outside \[0, 3\)"):
        torch.ops.compactrec.salted_hash(ids, torch.tensor([0, 1, 2, 0, 7, 0, 1, 2, 0, 1]), salts, None)
    with pytest.raises(RuntimeError, match=r"modulus 0 \(mods\[1\]\) is outside \[1, 2\*\*62\]"):
        torch.ops.compactrec.salted_hash(ids, None, salts, torch.tensor([5, 0, 3]))
    with pytest.raises(RuntimeError, match="mods must be a 1-D int64 tensor of 1 or F = 3"):
        torch.ops.compactrec.salted_hash(ids, None, salts, torch.tensor([5, 3]))


# ---- fallback: the torch-ops kernel, the same bits, logged ----------------------------------------------------
_CHILD = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
from embeddings.ops import salted_hash as fused_hash
from embeddings.hashing import hash_salt
from embeddings.id_hash import salted_hash
print("native", fused_hash.available())
ids = torch.arange(-500, 500) * 7919
feature = torch.arange(1000) % 3
salts = hash_salt(torch.arange(3)[:, None], 5, torch.arange(2)[None, :])
rows = torch.tensor([7, 75000, 2**62])
same = torch.equal(salted_hash(ids, feature, salts, rows=rows, wrap=torch.tensor([(1 << 64) % int(r) for r in rows]),
                               backend="torch"), torch.ops.compactrec.salted_hash(ids, feature, salts, rows))
def raw(v: torch.Tensor, f: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.ops.compactrec.salted_hash(v, f, s, None)
scripted = torch.jit.script(raw)
print("same", same, torch.equal(scripted(ids, feature, salts), salted_hash(ids, feature, salts, backend="torch")))
"""


def _child(tmp_path: Path, env: dict) -> str:
    script = tmp_path / "child.py"  # a file: TorchScript reads the scripted function's source
    script.write_text(_CHILD)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_without_a_compiler_the_torch_kernel_runs_and_is_logged(tmp_path: Path) -> None:
    out = _child(tmp_path, {"COMPACTREC_KERNEL_CACHE": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler"),
                  "COMPACTREC_FUSED_HASH": "1"})
    assert "native False" in out and "same True True" in out
    assert out.count("C++ kernels unavailable") == 1 and "falling back to their torch ops" in out


def test_disabled_by_environment(tmp_path: Path) -> None:
    out = _child(tmp_path, {"COMPACTREC_FUSED_HASH": "0"})
    assert "native False" in out and "same True True" in out and "C++ kernels disabled (COMPACTREC_NATIVE=0 or COMPACTREC_FUSED_HASH=0)" in out


def test_meta_tensors_give_shapes() -> None:
    ids = torch.empty(10, dtype=torch.int64, device="meta")
    salts = torch.empty(3, 2, dtype=torch.int64, device="meta")
    assert salted_hash(ids, ids, salts, num_buckets=5, backend="fused").shape == (10, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_use_the_torch_kernel_with_the_same_bits() -> None:
    ids = _random_ids(10_000, 3)
    feature = torch.randint(0, 5, (ids.numel(),), generator=torch.Generator().manual_seed(0))
    salts = hash_salt(torch.arange(5)[:, None], 1, torch.arange(2)[None, :])
    want = salted_hash(ids, feature, salts, num_buckets=75000, backend="torch")
    got = salted_hash(ids.cuda(), feature.cuda(), salts.cuda(), num_buckets=75000, backend="fused")
    assert got.is_cuda and torch.equal(got.cpu(), want)
