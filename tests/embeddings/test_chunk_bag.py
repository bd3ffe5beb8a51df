"""The fused chunk-bag operators (``embeddings.ops.chunk_bag``): the C++ kernels equal their torch reference
(forward bit for bit, backward with each fused optimizer within float tolerance), the module's fused path equals
its inner-EBC path, hot ids never collide, bad input is an error, the torch fallback runs when the C++ library is
disabled, and a module calling the operator exports with ``torch.export``."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from embeddings.hashing import hash_salt
from embeddings.hot_rows import HotLookup, HotSet, build_slots, reference_slots, slot_capacity
from embeddings.ops import chunk_bag, library
from tests.sharding.test_baselines_sharded import build_model, make_batch
from tests.sharding.test_hot_rows_sharded import _counts

ROOT = Path(__file__).resolve().parents[2]
native = pytest.mark.skipif(not chunk_bag.available(), reason="the C++ library did not build here")


def _hot(values: List[np.ndarray], verified: bool) -> Tuple[HotLookup, Dict[str, torch.Tensor]]:
    if verified:  # values beyond the packed range force verified keys
        values = [np.sort(np.concatenate([v, [-(2 ** 50) - i]])) for i, v in enumerate(values)]
    lookup = HotLookup(HotSet(tuple(f"f{i}" for i in range(len(values))), tuple(np.asarray(v, np.int64) for v in values)))
    assert lookup.mode == ("verified" if verified else "packed")
    return lookup, lookup.buffers(torch.device("cpu"))


def _case(seed: int, chunks: int, tables: int, hot: Optional[str], pooling: int,
          dtype: torch.dtype = torch.float32) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor, chunk_bag.BagArgs]:
    """Three features over ``tables`` tables (feature f on table f % tables), hashed rows then each feature's hot
    rows (``chunks`` rows per hot value) as the layouts place them; multi-hot bags, an empty one, repeated ids."""
    gen = torch.Generator().manual_seed(seed)
    num_features, batch, width = 3, 5, 4
    table_of_feature = torch.tensor([f % tables for f in range(num_features)], dtype=torch.int64)
    hashed = torch.tensor([7, 11, 5], dtype=torch.int64)
    lookup, buf = _hot([np.arange(n, dtype=np.int64) * 2 for n in (3, 0, 2)], hot == "verified") if hot else (None, {})
    hot_count = lookup.sizes if lookup is not None else [0] * num_features
    used = [max(int(hashed[f]) for f in range(num_features) if f % tables == t) for t in range(tables)]
    base = []
    for f in range(num_features):
        t = int(table_of_feature[f])
        base.append(used[t])
        used[t] += chunks * hot_count[f]
    weights = [torch.randn(used[t], width, generator=gen).to(dtype) for t in range(tables)]
    lengths = torch.randint(0, 4, (num_features * batch,), generator=gen)
    lengths[1] = 0  # an empty bag
    values = torch.randint(-(2 ** 40), 2 ** 40, (int(lengths.sum()),), generator=gen)
    values[::2] = torch.randint(0, 6, values[::2].shape, generator=gen)  # repeats, some of them hot
    salts = hash_salt(torch.arange(num_features)[:, None], seed, torch.arange(chunks)[None, :])
    args = chunk_bag.BagArgs(table_of_feature=table_of_feature, num_chunks=chunks, pooling=pooling, salts=salts,
                             rows=hashed)
    if lookup is not None:
        args = replace(args, hot_keys=buf["hot_keys"], hot_slots=buf["hot_slots"], hot_starts=buf["hot_starts"],
                       hot_values=buf.get("hot_values"), hot_salts=buf.get("hot_salts"), hot_shift=lookup.shift,
                       hot_base=torch.tensor(base, dtype=torch.int64))
    return weights, values, lengths, args


def _call(weights: List[torch.Tensor], values: torch.Tensor, lengths: torch.Tensor, a: chunk_bag.BagArgs,
          reference: bool, addresses: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    fn = chunk_bag._torch_forward if reference else torch.ops.compactrec.chunk_bag_forward
    return fn(weights, values, lengths, a.table_of_feature, a.salts, a.rows, addresses, a.hot_keys, a.hot_slots,
              a.hot_starts, a.hot_values, a.hot_salts, a.hot_shift, a.hot_base, a.num_chunks, a.pooling)


@native
def test_the_cpp_schemas_are_the_documented_ones() -> None:
    assert library.registered_schemas() == [f"compactrec::{s}" for s in library.SCHEMAS.values()]


@native
@pytest.mark.parametrize("chunks", [1, 2, 4])
@pytest.mark.parametrize("tables", [1, 2])
@pytest.mark.parametrize("hot", [None, "packed", "verified"])
@pytest.mark.parametrize("pooling", [0, 1])
def test_forward_equals_the_torch_reference(chunks: int, tables: int, hot: Optional[str], pooling: int) -> None:
    weights, values, lengths, args = _case(chunks * 10 + tables, chunks, tables, hot, pooling)
    out, addr = _call(weights, values, lengths, args, reference=False)
    want_out, want_addr = _call(weights, values, lengths, args, reference=True)
    assert torch.equal(addr, want_addr)
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    assert out.shape == (lengths.numel() // 3, 3 * chunks * 4)
    given, _ = _call(weights, values, lengths, args, reference=False, addresses=addr)
    assert torch.equal(given, out)  # the addresses path (LMA) gathers the same rows


@native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tables_forward(dtype: torch.dtype) -> None:
    weights, values, lengths, args = _case(3, 2, 1, "packed", 0, dtype)
    out, _ = _call(weights, values, lengths, args, reference=False)
    want, _ = _call(weights, values, lengths, args, reference=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@native
@pytest.mark.parametrize("optimizer", [1, 2, 3])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_backward_equals_the_torch_reference(optimizer: int, weight_decay: float, threads: int) -> None:
    weights, values, lengths, args = _case(5, 4, 2, "packed", 1)
    _, addr = _call(weights, values, lengths, args, reference=False)
    grad = torch.randn(lengths.numel() // 3, 3 * 4 * 4, generator=torch.Generator().manual_seed(9))

    def states() -> List[torch.Tensor]:
        if optimizer == 1:
            return []
        return [torch.full((w.shape[0] * (w.shape[1] if optimizer == 2 else 1),), 0.1) for w in weights]

    mine, mine_state = [w.clone() for w in weights], states()
    ref, ref_state = [w.clone() for w in weights], states()
    scratch = [torch.full((w.shape[0],), -1, dtype=torch.int32) for w in weights]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(3):
            torch.ops.compactrec.chunk_bag_backward(mine, mine_state, grad, addr, lengths, args.table_of_feature, 4,
                                                    1, optimizer, 0.1, 1e-8, weight_decay, scratch)
            chunk_bag._torch_backward(ref, ref_state, grad, addr, lengths, args.table_of_feature, 4, 1, optimizer,
                                      0.1, 1e-8, weight_decay, [])
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(mine + mine_state, ref + ref_state):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(bool((s == -1).all()) for s in scratch)  # the scratch maps are left clean
    assert any(float((a - w).abs().max()) > 1e-3 for a, w in zip(mine, weights))


def test_slot_table_finds_every_key_and_matches_the_python_build() -> None:
    keys = np.sort(np.random.default_rng(0).choice(2 ** 40, 5000, replace=False)).astype(np.int64)
    slots = reference_slots(keys)
    assert slots.size == slot_capacity(keys.size) and sorted(slots[slots >= 0].tolist()) == list(range(keys.size))
    if chunk_bag.available():  # the C++ build (used when it runs) is the same table
        native = torch.ops.compactrec.hot_slots(torch.from_numpy(keys), slot_capacity(keys.size)).numpy()
        assert np.array_equal(native, slots) and np.array_equal(build_slots(keys), slots)


def _module_pair(method: str, options: Dict[str, Any]) -> Tuple[Any, Any]:
    model, _ = build_model(method, options, seed=0, counts=_counts())
    fused = model.sparse
    tbe = copy.deepcopy(fused)
    tbe.layout = copy.copy(tbe.layout)
    tbe.layout.options = replace(tbe.layout.options, kernel="tbe")
    return fused, tbe


HOT = {"budget": 0.5, "hot_share": 0.4, "hot_min_count": 2}
MODULES = [
    ("hash", {"num_rows": 16, "pooling": "mean", "seed": 3}),
    ("hash", {"seed": 3, **HOT}),
    ("hash", {"num_rows": 70, "hash": "identity"}),
    ("robe", {"num_rows": 30, "chunk_size": 4, "seed": 3, "feature_groups": [["f1"], ["f0", "f2"]]}),
    ("robe", {"chunk_size": 2, "seed": 3, "pooling": "mean", **HOT}),
    ("robe", {"chunk_size": 8, "seed": 1, **HOT}),
]


@native
@pytest.mark.parametrize("method,options", MODULES)
def test_module_fused_path_equals_the_inner_ebc_path(method: str, options: Dict[str, Any]) -> None:
    fused, tbe = _module_pair(method, options)
    assert fused.uses_fused_kernel(torch.device("cpu")) and not tbe.uses_fused_kernel(torch.device("cpu"))
    for step in range(3):
        kjt = make_batch(step, 0).sparse_features
        a, b = fused(kjt), tbe(kjt)
        assert a.keys() == b.keys()
        torch.testing.assert_close(a.values(), b.values(), rtol=1e-6, atol=1e-7)
        (a.values() * torch.arange(a.values().numel()).view_as(a.values())).sum().backward()
        (b.values() * torch.arange(b.values().numel()).view_as(b.values())).sum().backward()
    for (name, p), (_, q) in zip(fused.named_parameters(), tbe.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)


OPTIM = {"sgd": (torch.optim.SGD, {"lr": 0.3}),
         "adagrad": (torch.optim.Adagrad, {"lr": 0.1, "eps": 1e-8}),
         "rowwise_adagrad": (RowWiseAdagrad, {"lr": 0.1, "eps": 1e-8})}


@native
@pytest.mark.parametrize("optimizer", list(OPTIM))
@pytest.mark.parametrize("method,options", [MODULES[1], MODULES[3], MODULES[4]])
def test_fused_optimizer_equals_the_dense_optimizer_after_20_steps(method: str, options: Dict[str, Any],
                                                                   optimizer: str) -> None:
    """The in-backward fused update (the trainer's) equals the same optimizer run densely on the inner-EBC path:
    a row without gradient does not move under SGD, Adagrad or row-wise Adagrad (no weight decay)."""
    fused, tbe = _module_pair(method, options)
    cls, kwargs = OPTIM[optimizer]
    apply_optimizer_in_backward(cls, list(fused.parameters()), dict(kwargs))
    dense = cls(list(tbe.parameters()), **kwargs)
    start = copy.deepcopy(tbe.state_dict())
    for step in range(20):
        kjt = make_batch(step % 5, step % 2).sparse_features
        target = torch.randn(4, 3 * 8, generator=torch.Generator().manual_seed(step))
        ((fused(kjt).values() - target) ** 2).sum().backward()
        dense.zero_grad()
        ((tbe(kjt).values() - target) ** 2).sum().backward()
        dense.step()
        assert all(p.grad is None for p in fused.parameters())  # updated in backward, no gradient kept
    moved = 0.0
    for name, value in fused.state_dict().items():
        torch.testing.assert_close(value, tbe.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)
        moved = max(moved, float((value - start[name]).abs().max()))
    assert moved > 1e-2


@native
def test_hot_ids_never_collide_and_take_their_own_rows() -> None:
    fused, _ = _module_pair("robe", {"chunk_size": 4, "seed": 3, **HOT})
    layout, buffers = fused.layout, fused.layout_buffers()
    args, names, computes = layout.fused_plan(buffers)
    assert computes
    hot_values = [torch.from_numpy(v) for v in layout.hot.hot.values]
    values = torch.cat([part for v in hot_values for part in (v, torch.arange(1000, 1100))])
    counts = [v.numel() + 100 for v in hot_values]
    # one id per bag; bags per feature made equal with empty ones
    batch = max(counts)
    lengths = torch.cat([torch.cat([torch.ones(n, dtype=torch.int64), torch.zeros(batch - n, dtype=torch.int64)])
                         for n in counts])
    _, addr = chunk_bag.forward(fused.fused_weights(names), values, lengths, args)
    rows = layout.rows_per_group[0]
    start = 0
    seen = set()
    for v in hot_values:
        hot_addr = addr[start:start + v.numel()]
        assert bool((hot_addr >= rows).all())  # after the hashed rows
        for r in hot_addr.reshape(-1).tolist():
            assert r not in seen
            seen.add(r)
        assert bool((addr[start + v.numel():start + v.numel() + 100] < rows).all())  # non-hot ids hash
        start += v.numel() + 100


@native
def test_bad_input_is_an_error_naming_it() -> None:
    weights, values, lengths, args = _case(1, 2, 1, None, 0)
    with pytest.raises(RuntimeError, match="lengths sum"):
        _call(weights, values[:-1], lengths, args, reference=False)
    addr = torch.full((values.numel(), 2), 10 ** 6, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="outside its table"):
        _call(weights, values, lengths, args, reference=False, addresses=addr)
    with pytest.raises(RuntimeError, match="rows"):
        _call(weights, values, lengths, replace(args, rows=torch.tensor([10 ** 6, 1, 1])), reference=False)
    with pytest.raises(ValueError, match="outside table"):
        _call(weights, values, lengths, args, reference=True, addresses=addr)


def test_the_torch_fallback_runs_when_the_library_is_disabled(tmp_path: Path) -> None:
    script = tmp_path / "fallback.py"
    script.write_text(
        "import logging, torch\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from embeddings.ops import chunk_bag\n"
        "from tests.embeddings.test_chunk_bag import _case, _call\n"
        "assert not chunk_bag.available()\n"
        "w, v, l, a = _case(2, 2, 2, 'packed', 1)\n"
        "out = chunk_bag.forward(w, v, l, a)[0]\n"
        "want = _call(w, v, l, a, reference=True)[0]\n"
        "assert torch.equal(out, want)\n"
        "print('fallback ok')\n")
    env = {**os.environ, "COMPACTREC_NATIVE": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fallback ok" in done.stdout
    assert "C++ kernels disabled" in done.stderr


class _Exportable(torch.nn.Module):
    def __init__(self, weights: List[torch.Tensor], args: chunk_bag.BagArgs) -> None:
        super().__init__()
        self.w0 = torch.nn.Parameter(weights[0], requires_grad=False)
        self.register_buffer("tof", args.table_of_feature)
        self.register_buffer("salts", args.salts)
        self.register_buffer("rows", args.rows)
        self.chunks, self.pooling = args.num_chunks, args.pooling

    def forward(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return torch.ops.compactrec.chunk_bag_forward([self.w0], values, lengths, self.tof, self.salts, self.rows, None,
                                                      None, None, None, None, None, 1, None, self.chunks,
                                                      self.pooling)[0]


def test_a_module_calling_the_operator_exports() -> None:
    chunk_bag.ensure_ops()
    weights, values, lengths, args = _case(4, 2, 1, None, 0)
    module = _Exportable(weights, args)
    program = torch.export.export(module, (values, lengths), strict=False)
    torch.testing.assert_close(program.module()(values, lengths), module(values, lengths))


def test_kernel_option_is_checked() -> None:
    from embeddings.robe import RobeOptions

    with pytest.raises(ValueError, match="kernel"):
        RobeOptions(kernel="gpu")


