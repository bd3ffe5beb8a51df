"""Inference benchmark: every method's inference module (``embeddings.quant``: its id maths, then TorchRec's
quantized EBC on fbgemm's inference TBE) at CriteoTB row counts / ``scale``, against the full tables at equal
precision.

Cells are (scale, precision), smallest first, one at a time; a cell whose tables do not fit the memory free at
that moment (keeping ``--reserve-gib`` free for others) is skipped and recorded with the reason. In a cell every
method is built without any float table (rows quantized ``CHUNK_ROWS`` at a time from random values), then for
each id law (zipf, uniform), batch size and thread count, round ``i`` runs every method once in rotated order
(interleaved, so load bursts hit all alike), timing:

- ``embedding``: the sparse module, KJT of raw one-hot ids (26 features) -> pooled KeyedTensor;
- ``ids`` / ``lookup``: its two parts alone - the method's id maths (``full``: ``id mod rows``; hashed methods:
  ``expand`` on the registered hashing operator, MEM-REC also ``weigh``) and the quantized EBC on the prepared
  KJT - which is what bounds the stage;
- ``model`` (``--model-batch-sizes``): the whole model, ``configs/criteo_tb_dlrmv2.yaml``'s MLPs with ``--arch``
  (``dlrm``: MLPerf v1's dot interaction, the DLRM MEM-REC measured on; MEM-REC per sample: its own head).

Each is reported as median [p10, p90] ms, the ratio full / method at equal precision (same run), and the
fraction of the memory-bandwidth bound: bytes a batch must move (rows gathered in whole 64-byte lines, ids,
per-lookup weights, output) / read bandwidth measured in the same run at the same thread count / median.
Results are written after every cell; a rerun skips cells already in ``--out``.

    PYTHONPATH=. .venv/bin/python benchmarks/inference.py --quick
    PYTHONPATH=. .venv/bin/python benchmarks/inference.py --out benchmarks/results/inference.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from bench_common import machine_info, summary  # benchmarks/ is on sys.path when this file runs as a script
from embedding_stage import TB_ROWS, sample_ids, scaled_rows
from embeddings import registry
from embeddings.quant import (
    BITS,
    ReducedIdsEmbeddingBagCollection,
    SparseParts,
    _form,
    inner_ebc,
    build_sparse,
    config_dict,
)
from embeddings.types import SparseArchContext
from report_common import result_header
from stage_methods import build_lma_index
from variants import sized_options, variant
from trainer.strict import from_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ROW_ALIGNMENT = 16  # TorchRec's quantized EBC pads every row to 16 bytes
# the variants measured here, with their hashing on the registered operator (the inference path)
INFERENCE_VARIANTS = ("full", "memrec", "memrec_sample", "robe", "hash", "lma")
METHODS = {name: (variant(name).kind, {**sized_options(name, 128), **({} if name == "full" else {"hash_backend": "fused"})})
           for name in INFERENCE_VARIANTS}


def row_bytes(dim: int, precision: str) -> int:
    raw = dim * BITS[precision] // 8 + (4 if BITS[precision] < 16 else 0)
    return -(-raw // ROW_ALIGNMENT) * ROW_ALIGNMENT


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 2**20


# ---------------------------------------------------------------------------------------------- building
def build_method(name: str, ctx: SparseArchContext, precision: str, lma_index: Optional[str]) -> Tuple[nn.Module, Any]:
    """The method's inference module with random rows, built without any float table, and its SparseArch."""
    from trainer.train.model import SparseArch

    kind, opts = METHODS[name]
    spec = registry.get(kind)
    options = from_dict(spec.options_type, {**opts, **({"index_path": lma_index} if kind == "lma" else {})})
    shell = spec.build(SparseArchContext(ctx.feature_names, ctx.num_embeddings_per_feature, ctx.embedding_dim,
                                         torch.device("meta")), options)
    form = _form(shell)
    inner = inner_ebc(shell)
    configs = [config_dict(c) for c in inner.embedding_bag_configs()]
    gen = torch.Generator().manual_seed(0)
    # float rows made and quantized chunk by chunk straight into the kernel's storage
    tables = {c["name"]: (lambda a, b, d=c["embedding_dim"]: torch.empty(b - a, d).uniform_(-0.05, 0.05,
                                                                                            generator=gen))
              for c in configs}
    buffers: Dict[str, torch.Tensor] = {}
    parameters: Dict[str, torch.Tensor] = {}
    if form == "full":
        buffers["rows"] = torch.tensor([c["num_embeddings"] for c in configs])
    elif form == "remapped":
        buffers = shell.layout.buffers(torch.device("cpu"))
    else:
        buffers = dict(zip(("token_salts", "weight_salts"), shell.layout.salts()))
        parameters["weight_table"] = torch.rand(shell.layout.weight_table_rows, 1, generator=gen) + 0.5
    parts = SparseParts(form, precision, configs, bool(inner.is_weighted()), tables, getattr(shell, "layout", None),
                        buffers, parameters)
    module = build_sparse(parts, torch.device("cpu"))
    return module, SparseArch(spec=spec, options=options, context=ctx, module=module)


def build_model(arch: Any, model_arch: str) -> nn.Module:
    """The whole model around the sparse module: ``configs/criteo_tb_dlrmv2.yaml``'s MLPs with ``model_arch``
    (``dlrm``: MLPerf v1's dot interaction, where MEM-REC measured; ``dlrm_dcn``: DLRMv2); MEM-REC per sample
    brings its own head (the released code's concatenation)."""
    from trainer.config import load_config
    from trainer.train.model import build_dlrm

    config = load_config(CONFIGS / "criteo_tb_dlrmv2.yaml", [f"model.arch={model_arch}"])
    return build_dlrm(config, arch, torch.device("cpu")).eval()


def stage_fns(module: nn.Module, kjt: KeyedJaggedTensor) -> Dict[str, Callable[[], Any]]:
    """``ids`` (the id maths alone) and ``lookup`` (the quantized EBC alone, on the ids' KJT)."""
    form = "full" if isinstance(module, ReducedIdsEmbeddingBagCollection) else _form(module)
    if form == "full":
        from embeddings.checks import select_features

        def ids() -> KeyedJaggedTensor:
            f = select_features(kjt, module.feature_names, "full")
            values = f.values()
            modulus = torch.repeat_interleave(module.rows, f.lengths().view(len(module.feature_names), -1).sum(1),
                                              output_size=values.numel())
            return KeyedJaggedTensor(keys=module.feature_names, values=torch.remainder(values, modulus),
                                     lengths=f.lengths(), stride=f.stride())
        inner = module.ebc
    elif form == "remapped":
        def ids() -> KeyedJaggedTensor:
            return module.layout.expand(kjt, module.layout_buffers())[0]
        inner = module.ebc
    else:
        def ids() -> KeyedJaggedTensor:
            expanded, _ = module.layout.expand(kjt, module.token_salts, module.weight_salts)
            return module.layout.weigh(expanded, module.weight_table)
        inner = module.token_ebc
    p = ids()

    def lookup() -> Any:  # a fresh KJT each call: its offsets and per-key lengths are computed as in the module
        return inner(KeyedJaggedTensor(keys=p.keys(), values=p.values(), weights=p.weights_or_none(),
                                       lengths=p.lengths(), stride=p.stride()))
    return {"ids": ids, "lookup": lookup}


def bytes_per_batch(name: str, module: nn.Module, batch: int, features: int, dim: int, precision: str) -> int:
    opts = METHODS[name][1]
    lookups = batch * features * opts.get("num_token_hashes", 1) * opts.get("num_weight_hashes", 1)
    line = -(-row_bytes(dim, precision) // 64) * 64
    weights = 4 * lookups if METHODS[name][0] == "memrec" else 0
    outputs = batch * (1 if opts.get("granularity") == "per_sample" else features)
    return lookups * (line + 8) + weights + outputs * dim * 4


def bandwidth_gbs(threads: int, mib: int = 1024, repeats: int = 5) -> float:
    """Read bandwidth: ``sum`` over a ``mib`` MiB float32 array (bytes read / median time)."""
    torch.set_num_threads(threads)
    a = torch.rand(mib * 2**20 // 4)
    a.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    return a.numel() * 4 / float(np.median(times)) / 1e9


# ---------------------------------------------------------------------------------------------- timing
def stage_calls(stage: str, module: nn.Module, model: Optional[nn.Module],
                inputs: Sequence[Tuple[torch.Tensor, KeyedJaggedTensor]]) -> List[Callable[[], Any]]:
    """One call per distinct input batch (cycled, so no stage re-reads the rows of the batch before)."""
    if stage in ("ids", "lookup"):
        return [stage_fns(module, kjt)[stage] for _, kjt in inputs]
    if stage == "embedding":
        return [lambda kjt=kjt: module(kjt) for _, kjt in inputs]
    assert model is not None
    return [lambda dense=dense, kjt=kjt: model(dense, kjt) for dense, kjt in inputs]


def cycle(calls: Sequence[Callable[[], Any]]) -> Callable[[], Any]:
    position = [0]

    def call() -> Any:
        position[0] += 1
        return calls[position[0] % len(calls)]()
    return call


def interleaved(fns: Dict[str, Callable[[], Any]], warmup: int, repeats: int) -> Dict[str, List[float]]:
    names = list(fns)
    out: Dict[str, List[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            shift = i % len(names)
            for n in names[shift:] + names[:shift]:
                t = time.perf_counter()
                fns[n]()
                if i >= warmup:
                    out[n].append(time.perf_counter() - t)
    return out


def make_batch(rng: np.random.Generator, names: Sequence[str], rows: Sequence[int], batch: int,
               dist: str) -> Tuple[torch.Tensor, KeyedJaggedTensor]:
    values = np.concatenate([sample_ids(rng, n, batch, dist) for n in rows])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=list(names), values=torch.from_numpy(values),
                                              lengths=torch.ones(len(names) * batch, dtype=torch.int32))
    return torch.from_numpy(rng.random((batch, 13), dtype=np.float32)), kjt


def table_gib(methods: Sequence[str], rows: Sequence[int], dim: int, precision: str) -> float:
    """Rows of every method's tables: full, 1/16 of it for each memory_fraction method, 75000 for MEM-REC."""
    full = sum(rows) * row_bytes(dim, precision)
    total = 0.0
    for name in methods:
        opts = METHODS[name][1]
        total += full * opts["memory_fraction"] if "memory_fraction" in opts else \
            opts.get("num_token_rows", 0) * row_bytes(dim, precision) if name != "full" else full
    return total / 2**30


def run_cell(args: argparse.Namespace, scale: int, precision: str, bandwidth: Dict[int, float],
             lma_dir: Path) -> Dict[str, Any]:
    rows = scaled_rows(TB_ROWS, scale)
    names = [f"cat_{i}" for i in range(len(rows))]
    dim = args.dim
    ctx = SparseArchContext(names, rows, dim, torch.device("cpu"))
    methods = args.claim_methods if scale in args.claim_only_scales else args.methods
    full_gib = sum(rows) * row_bytes(dim, precision) / 2**30
    tables = table_gib(methods, rows, dim, precision)
    need = tables + 0.5 + args.reserve_gib
    have = available_gib()
    cell: Dict[str, Any] = {"scale": scale, "precision": precision, "full_table_gib": full_gib, "methods": methods,
                            "available_gib_at_start": have, "records": []}
    if need > have:
        cell["skipped"] = (f"needs about {need:.1f} GiB free (tables {tables:.1f} GiB + 0.5 GiB work + "
                           f"{args.reserve_gib} GiB kept for others), {have:.1f} GiB available")
        print(f"== 1/{scale} {precision}: skipped: {cell['skipped']}", flush=True)
        return cell
    print(f"== 1/{scale} {precision}: full tables {full_gib:.2f} GiB ({have:.1f} GiB available)", flush=True)
    torch.set_num_threads(max(args.threads))
    lma_index = None
    if "lma" in methods:
        lma_index = str(lma_dir / f"lma_{scale}.npz")
        if not Path(lma_index).exists():
            build_lma_index(Path(lma_index), names, rows, "zipf", args.lma_sample_rows, sample_ids)
    built: Dict[str, nn.Module] = {}
    models: Dict[str, nn.Module] = {}
    for name in methods:
        t = time.perf_counter()
        built[name], arch = build_method(name, ctx, precision, lma_index)
        if args.model_batch_sizes:
            models[name] = build_model(arch, args.arch)
        tb = sum(p.numel() for n, p in built[name].named_buffers() if "embedding_bags" in n)
        cell.setdefault("table_bytes", {})[name] = tb
        print(f"   built {name} in {time.perf_counter() - t:.1f} s ({tb / 2**30:.3f} GiB of rows)", flush=True)
    rng = np.random.default_rng(123)
    for dist in args.dists:
        for batch in sorted(set(args.batch_sizes) | set(args.model_batch_sizes)):
            inputs = [make_batch(rng, names, rows, batch, dist) for _ in range(args.distinct_batches)]
            for threads in args.threads:
                torch.set_num_threads(threads)
                stages = ["embedding", "ids", "lookup"] if batch in args.batch_sizes else []
                stages += ["model"] if batch in args.model_batch_sizes else []
                for stage in stages:
                    fns = {name: cycle(stage_calls(stage, built[name], models.get(name), inputs))
                           for name in methods}
                    reps = args.model_repeats if stage == "model" else args.repeats
                    times = interleaved(fns, args.warmup, reps)
                    medians = {n: float(np.median(t)) for n, t in times.items()}
                    for name in methods:
                        rec = {"dist": dist, "batch": batch, "threads": threads, "stage": stage, "method": name,
                               **summary(times[name]), "vs_full": medians["full"] / medians[name]}
                        if stage == "embedding":
                            moved = bytes_per_batch(name, built[name], batch, len(names), dim, precision)
                            rec["bandwidth_bound_ms"] = moved / (bandwidth[threads] * 1e9) * 1e3
                            rec["fraction_of_bandwidth_bound"] = rec["bandwidth_bound_ms"] / rec["median_ms"]
                        cell["records"].append(rec)
                    line = "  ".join(f"{n} {medians[n] * 1e3:.2f}" + (f" ({medians['full'] / medians[n]:.2f}x)"
                                                                     if n != "full" else "") for n in methods)
                    print(f"   {dist:7s} B={batch:5d} t={threads} {stage:9s} ms: {line}", flush=True)
    del built, models
    gc.collect()
    return cell


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    words = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--scales", type=ints, default=[16, 4, 2], help="CriteoTB rows divided by these")
    p.add_argument("--precisions", type=words, default=["fp32", "fp16", "int8"])
    p.add_argument("--int8-only-scales", type=ints, default=[2], help="scales run at int8 only (the largest)")
    p.add_argument("--methods", type=words, default=list(METHODS))
    p.add_argument("--claim-only-scales", type=ints, default=[4, 2],
                   help="scales where only --claim-methods run (the 1/16-size tables of the others cost memory)")
    p.add_argument("--claim-methods", type=words, default=["full", "memrec", "memrec_sample"])
    p.add_argument("--dists", type=words, default=["zipf", "uniform"])
    p.add_argument("--batch-sizes", type=ints, default=[512, 2048, 8192])
    p.add_argument("--model-batch-sizes", type=ints, default=[2048], help="whole-model timings (none: '')")
    p.add_argument("--threads", type=ints, default=[1, os.cpu_count() or 1])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--arch", default="dlrm", choices=("dlrm", "dlrm_dcn"), help="whole model's interaction")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--model-repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--distinct-batches", type=int, default=3)
    p.add_argument("--lma-sample-rows", type=int, default=125_000)
    p.add_argument("--reserve-gib", type=float, default=6.0, help="memory kept free for other jobs")
    p.add_argument("--out", default="benchmarks/results/inference.json")
    p.add_argument("--quick", action="store_true", help="a run under 5 minutes that still prints every ratio")
    args = p.parse_args(argv)
    if args.quick:
        args.scales, args.int8_only_scales, args.precisions, args.claim_only_scales = [64], [], ["fp32", "int8"], []
        args.dists, args.batch_sizes, args.model_batch_sizes, args.threads = ["zipf"], [2048], [512], [1]
        args.repeats, args.model_repeats, args.lma_sample_rows = 7, 3, 20_000
        if args.out == "benchmarks/results/inference.json":
            args.out = "benchmarks/results/inference_quick.json"
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    import logging
    import tempfile
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    args = parse(argv)
    out = Path(args.out)
    results: Dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"cells": []}
    results.setdefault("runs", []).append({"args": vars(args), "machine": machine_info(),
                                           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    bandwidth = {t: bandwidth_gbs(t) for t in args.threads}
    results["runs"][-1]["read_bandwidth_gbs"] = bandwidth
    print("read bandwidth: " + ", ".join(f"{t} thread(s) {b:.1f} GB/s" for t, b in bandwidth.items()), flush=True)
    done = {(c["scale"], c["precision"]) for c in results["cells"] if "skipped" not in c}
    lma_dir = Path(tempfile.mkdtemp(prefix="inference_bench_"))
    for scale in sorted(args.scales, reverse=True):
        for precision in args.precisions:
            if (scale in args.int8_only_scales and precision != "int8") or (scale, precision) in done:
                continue
            cell = run_cell(args, scale, precision, bandwidth, lma_dir)
            cell["loadavg"] = os.getloadavg()
            results["cells"] = [c for c in results["cells"] if (c["scale"], c["precision"]) != (scale, precision)]
            results["cells"].append(cell)
            out.parent.mkdir(parents=True, exist_ok=True)
            results["header"] = result_header()
            out.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
