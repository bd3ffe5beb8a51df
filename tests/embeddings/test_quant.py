"""Inference modules on fbgemm's inference TBE (``embeddings.quant``): every method's module with its inner EBC
swapped for TorchRec's quantized EBC gives the float module's output exactly at fp32 and within the rounding of
each precision below it; the parts survive a ``torch.save`` round trip (the LMA dictionary without its index
file); a precision the kernel lacks, an unpackable width or wrong rows are clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings import registry
from embeddings.quant import (
    SparseParts,
    build_sparse,
    quantize_rows,
    quantize_table,
    quantized_ebc,
    split_sparse,
    to_inference,
)
from embeddings.types import SparseArchContext
from tests.embeddings.test_lma import write_synthetic_index
from trainer.train.ids import reduce_ids
from trainer.strict import from_dict

FEATURES = ["f0", "f1", "f2"]
SIZES = [40, 25, 60]
DIM = 8
# relative error of the output against the float module: fp16 rounds each element (~2**-11), int8/int4 use 255/15 levels a row
TOLERANCE = {"fp32": 0.0, "fp16": 1e-3, "int8": 1e-2, "int4": 1.5e-1}  # measured: 3e-4, 5e-3, 9e-2 at most

METHODS: Dict[str, Dict[str, Any]] = {
    "full": {},
    "full_mean": {"pooling": "mean"},
    "memrec": {"num_token_rows": 97, "num_weight_rows": 31, "num_token_hashes": 2, "num_weight_hashes": 2, "seed": 5},
    "memrec_per_sample": {"num_token_rows": 97, "num_weight_rows": 31, "granularity": "per_sample", "pooling": "mean"},
    "robe": {"num_rows": 37, "chunk_size": 4, "seed": 1},
    "hash": {"memory_fraction": 0.5, "pooling": "mean"},
    "qr": {"num_collisions": 3},
    "lma": {"num_rows": 41, "chunk_size": 4, "seed": 3, "num_hashes": 2},
}


def _kjt(seed: int, batch: int = 16) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(FEATURES) * batch,), generator=gen)
    values = torch.randint(-(2**40), 2**40, (int(lengths.sum()),), generator=gen)
    values[::2] = torch.randint(0, 20, values[::2].shape, generator=gen)  # ids the LMA index holds
    return KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=values, lengths=lengths)


def _module(method: str, tmp_path: Path) -> torch.nn.Module:
    kind = method.split("_")[0]
    options = dict(METHODS[method])
    if kind == "lma":
        write_synthetic_index(tmp_path / "index.npz")
        options["index_path"] = str(tmp_path / "index.npz")
    spec = registry.get(kind)
    torch.manual_seed(0)
    module = spec.build(SparseArchContext(FEATURES, SIZES, DIM, torch.device("cpu")),
                        from_dict(spec.options_type, options))
    with torch.no_grad():  # trained-looking tables: not the init's narrow range, some rows far from the rest
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * torch.rand(p.shape[0], 1) * 2)
    return module.eval()


def _reference(module: torch.nn.Module, kjt: KeyedJaggedTensor, method: str) -> torch.Tensor:
    with torch.no_grad():  # full: the training data path reduces ids mod rows; the inference module does it itself
        return module(reduce_ids(kjt, torch.tensor(SIZES)) if method.startswith("full") else kjt).values()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("precision", list(TOLERANCE))
def test_inference_module_matches_the_float_module(method: str, precision: str, tmp_path: Path) -> None:
    module = _module(method, tmp_path)
    inference = to_inference(module, precision)
    for seed in range(2):
        kjt = _kjt(seed)
        want = _reference(module, kjt, method)
        with torch.no_grad():
            got = inference(kjt).values()
        assert got.shape == want.shape
        if precision == "fp32":  # the same rows; MEAN divides in another order (fbgemm: sum * 1/n)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:
            error = float((got - want).norm() / want.norm())
            assert 0 < error < TOLERANCE[precision], error


@pytest.mark.parametrize("method", ["memrec", "lma", "qr", "full"])
def test_parts_round_trip_through_a_file_without_the_lma_index(method: str, tmp_path: Path) -> None:
    module = _module(method, tmp_path)
    parts = split_sparse(module, "int8")
    torch.save(parts.__dict__, tmp_path / "parts.pt")
    for f in tmp_path.glob("index.npz"):
        f.unlink()  # the dictionary travels as the module's buffers
    loaded = SparseParts(**torch.load(tmp_path / "parts.pt", weights_only=False))
    kjt = _kjt(7)
    with torch.no_grad():
        assert torch.equal(build_sparse(loaded, torch.device("cpu"))(kjt).values(), to_inference(module, "int8")(kjt).values())
    if method == "lma":
        assert {"lma_index_keys", "lma_index_rows"} <= set(loaded.buffers)


def test_hashing_runs_on_the_registered_operator_in_inference(tmp_path: Path) -> None:
    module = _module("memrec", tmp_path)
    assert module.layout.options.hash_backend == "torch"
    parts = split_sparse(module, "fp16")
    assert parts.layout.options.hash_backend == "fused" and module.layout.options.hash_backend == "torch"


def test_quantize_table_in_chunks_equals_one_pass() -> None:
    rows = torch.randn(1000, 16) * torch.rand(1000, 1) * 4
    for precision in ("fp16", "int8", "int4"):
        whole = quantize_rows(rows, precision)
        chunked = quantize_table(1000, 16, precision, lambda a, b: rows[a:b], chunk_rows=137)
        assert all(torch.equal(whole[k], chunked[k]) for k in whole if whole[k] is not None)


def _configs(dim: int) -> list:
    return [{"name": "t", "embedding_dim": dim, "num_embeddings": 10, "feature_names": ["f0"], "pooling": "SUM"}]


def test_precision_the_kernel_lacks_is_an_error(tmp_path: Path) -> None:
    module = _module("hash", tmp_path)
    for precision in ("bf16", "int2", "fp8", "INT8"):
        with pytest.raises(ValueError, match=f"precision {precision!r} is not a table precision.*fp32, fp16, int8, int4"):
            split_sparse(module, precision)


def test_odd_width_at_int4_and_wrong_rows_are_errors() -> None:
    with pytest.raises(ValueError, match=r"int4 packs 2 values per byte; tables t \(dim 3\)"):
        quantized_ebc(_configs(3), False, {"t": quantize_rows(torch.randn(10, 4), "int4")}, "int4", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"table t: int8 rows must be uint8 \[10, 8\]"):
        quantized_ebc(_configs(8), False, {"t": quantize_rows(torch.randn(9, 8), "int8")}, "int8", torch.device("cpu"))
    with pytest.raises(ValueError, match="table t: int8 rows need per-row scale and shift"):
        table = quantize_rows(torch.randn(10, 8), "int8")
        quantized_ebc(_configs(8), False, {"t": {"weight": table["weight"], "scale_shift": None}}, "int8",
                      torch.device("cpu"))
    with pytest.raises(ValueError, match=r"no quantized rows for tables \['t'\]"):
        quantized_ebc(_configs(8), False, {}, "fp16", torch.device("cpu"))


def test_a_buffer_this_code_does_not_know_is_an_error(tmp_path: Path) -> None:
    parts = split_sparse(_module("robe", tmp_path), "fp32")
    parts.buffers["hot_keys"] = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="has buffers .* the artifact has .*hot_keys"):
        build_sparse(parts, torch.device("cpu"))
    parts = split_sparse(_module("robe", tmp_path), "fp32")
    parts.buffers["chunk_rows"] = parts.buffers["chunk_rows"][:2]
    with pytest.raises(ValueError, match=r"buffer 'chunk_rows': this code's module has .*\[3\].* the artifact .*\[2\]"):
        build_sparse(parts, torch.device("cpu"))
