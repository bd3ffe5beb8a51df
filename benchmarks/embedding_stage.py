"""Embedding-stage benchmark (issue 6): full vs memrec vs lma vs robe/hash/qr, single process, CPU.

Every method is built through the registry exactly as the trainer builds it (``registry.get(kind).build``)
on ``meta``, its fused sparse optimizer is attached with ``trainer.optim.apply_sparse_optimizer`` (fused
SGD in fbgemm's TBE backward, as in training) and it is wrapped by TorchRec's ``DistributedModelParallel``
with world size 1 (gloo, CPU) and the method's own sharders/constraints - i.e. the same fbgemm CPU TBE
kernels and remapping code the trainer runs, without any communication cost.

Timed per batch (median, p10, p90 over ``--repeats``, after ``--warmup`` untimed steps that also touch the
tables):
- ``fwd``: forward under ``torch.no_grad()`` (inference lookup, including hashing/remapping);
- ``train``: forward + backward of ``(out * g).sum()`` + the fused SGD update of the touched rows.

Also measured in the same run: a STREAM-style copy bandwidth (torch ``copy_`` of a large float32 array,
read + write bytes counted), and for each method the bytes it must move per batch (see ``bytes_touched``),
so that every time is also given as the fraction of the bandwidth bound it reaches.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/embedding_stage.py --quick
    PYTHONPATH=. .venv/bin/python benchmarks/embedding_stage.py --shapes tb,kaggle --tb-scale 64 \
        --batch-sizes 512,2048,8192 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings import registry
from embeddings.types import SparseArchContext, TopologyInfo
from trainer.config import OptimizerConfig, load_config
from trainer.optim import apply_sparse_optimizer
from trainer.strict import from_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def preset_rows(preset: str) -> List[int]:
    """The table sizes a preset trains with (one source of truth: the config files)."""
    return list(load_config(CONFIGS / preset).embeddings.num_embeddings_per_feature or [])


KAGGLE_ROWS = preset_rows("criteo_kaggle.yaml")
TB_ROWS = preset_rows("criteo_tb_dlrmv2.yaml")  # MLPerf DLRMv2 row counts


# ---------------------------------------------------------------------------------------------- data
def scaled_rows(rows: Sequence[int], scale: int) -> List[int]:
    return [max(1, math.ceil(r / scale)) for r in rows]


def sample_ids(rng: np.random.Generator, n: int, size: int, dist_name: str) -> np.ndarray:
    """``size`` ids in ``[0, n)``: uniform, or Zipf-like (P(rank r) ~ 1/r, via log-uniform ranks) with the hot
    ranks scattered over the table by a multiplicative permutation (hot rows are not adjacent)."""
    if dist_name == "uniform" or n == 1:
        return rng.integers(0, n, size=size, dtype=np.int64)
    ranks = np.floor(np.exp(rng.random(size) * math.log(n + 1.0))).astype(np.int64) - 1
    ranks = np.clip(ranks, 0, n - 1)
    return (ranks * 2654435761) % n


def make_kjt(rng: np.random.Generator, names: Sequence[str], rows: Sequence[int], batch: int,
             dist_name: str) -> KeyedJaggedTensor:
    values = np.concatenate([sample_ids(rng, n, batch, dist_name) for n in rows])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(names), values=torch.from_numpy(values),
        lengths=torch.ones(len(names) * batch, dtype=torch.int32))


# ------------------------------------------------------------------------------------------- methods
FUSED_SUFFIX = "_fused"  # e.g. memrec_fused: the same method with ``hash_backend: fused`` (one-pass C hashing)


def base_method(method: str) -> str:
    return method[: -len(FUSED_SUFFIX)] if method.endswith(FUSED_SUFFIX) else method


def method_options(method: str, shape: str, dim: int, lma_index: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """(registry kind, options dict) of each benchmarked variant; ``<method>_fused`` adds ``hash_backend: fused``."""
    if method.endswith(FUSED_SUFFIX):
        kind, opts = method_options(base_method(method), shape, dim, lma_index)
        if kind == "full":
            raise ValueError("full has no id hashing (no _fused variant)")
        return kind, {**opts, "hash_backend": "fused"}
    if method == "full":
        return "full", {}
    if method == "memrec":  # released CriteoTB setting: D = dw = 75000, K = kw = 1, shared tables
        return "memrec", {"num_token_rows": 75000, "num_weight_rows": 75000, "num_token_hashes": 1,
                          "num_weight_hashes": 1, "weight_init": "ones"}
    if method == "memrec_k2":  # the small-config setting K = 2
        return "memrec", {"num_token_rows": 75000, "num_weight_rows": 75000, "num_token_hashes": 2,
                          "num_weight_hashes": 1, "weight_init": "ones"}
    if method == "lma":
        return "lma", {"memory_fraction": 1 / 16, "chunk_size": dim, "num_hashes": 2, "index_path": lma_index}
    if method == "robe":
        return "robe", {"memory_fraction": 1 / 16, "chunk_size": dim}
    if method == "hash":
        return "hash", {"memory_fraction": 1 / 16}
    if method == "qr":
        return "qr", {"num_collisions": 4}
    raise ValueError(f"unknown method {method!r}")


def build_lma_index(path: Path, names: Sequence[str], rows: Sequence[int], dim: int, dist_name: str,
                    sample_rows: int, seed: int = 0) -> None:
    """An index artifact from ``sample_rows`` synthetic rows (same id law as the benchmark batches), built
    with the trainer's accumulator (``trainer.lma_index.build_lma_index`` minus the data loader)."""
    from embeddings.hashing import mix64
    from embeddings.lma_index import IndexHeader, LmaIndex, save_index
    from embeddings.lma_minhash import KEY_SEED, SignatureAccumulator, key_salts, row_ranks

    num_hashes, num_chunks = 2, 1
    rng = np.random.default_rng(seed + 1)
    acc = SignatureAccumulator(row_ranks(sample_rows, num_chunks * num_hashes, seed))
    salts = key_salts(len(names))
    for f, n in enumerate(rows):
        ids = torch.from_numpy(sample_ids(rng, n, sample_rows, dist_name))
        feature = torch.full((sample_rows,), f, dtype=torch.int64)
        acc.add(mix64(ids ^ salts[feature]).numpy(), np.arange(sample_rows), feature.numpy())
    sig = acc.result()
    keep = sig.counts >= 1
    header = IndexHeader(seed=seed, num_chunks=num_chunks, num_hashes=num_hashes, key_seed=KEY_SEED,
                         feature_names=list(names), rows_sampled=sample_rows, rows_available=sample_rows,
                         values_seen=len(sig), values_covered=int(keep.sum()), min_count=1,
                         sample_rows=sample_rows, values_per_feature=np.bincount(sig.features[keep], minlength=len(names)).tolist(),
                         source={"synthetic": dist_name, "benchmark": "embedding_stage"})
    save_index(LmaIndex(header, sig.keys[keep], sig.signatures[keep], sig.features[keep], sig.counts[keep]), path)


class Wrapper(nn.Module):
    def __init__(self, sparse: nn.Module) -> None:
        super().__init__()
        self.sparse = sparse

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.sparse(kjt).values()


def build_dmp(kind: str, opts: Dict[str, Any], ctx: SparseArchContext, lr: float) -> Tuple[nn.Module, Any, Any]:
    spec = registry.get(kind)
    options = from_dict(spec.options_type, opts)
    module = spec.build(ctx, options)
    mem = spec.memory(module, ctx, options, "sgd")
    apply_sparse_optimizer(module, OptimizerConfig(sparse="sgd", sparse_lr=lr))
    sharders = spec.sharders(options)
    topo_info = TopologyInfo(1, 1, "cpu")
    constraints = spec.default_constraints(module, options, topo_info) if spec.default_constraints else None
    model = Wrapper(module)
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"),
                                       constraints=constraints)
    plan = planner.plan(model, sharders)
    dmp = DistributedModelParallel(module=model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    return dmp, mem, options


# ------------------------------------------------------------------------------------------ measures
def stream_copy_gbs(mib: int, repeats: int) -> Dict[str, float]:
    n = mib * (1 << 20) // 4
    a = torch.rand(n)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t)
    gbs = [2 * a.numel() * 4 / t / 1e9 for t in times]
    return {"array_mib": mib, "median_gbs": statistics.median(gbs), "max_gbs": max(gbs),
            "min_gbs": min(gbs), "repeats": repeats}


def bytes_touched(method: str, opts: Dict[str, Any], num_ids: int, dim: int, index_values: int) -> Dict[str, int]:
    """Minimum bytes moved per batch of ``num_ids`` one-hot ids (model, not measured).

    fwd = ids read (8 B) + embedding rows gathered (4*dim B per lookup) + side reads + pooled output written
    (4*dim B per bag); train adds the output gradient read (4*dim per bag) and a read+write of every
    gathered row for the SGD update (upper bound: duplicate ids counted each time)."""
    row = 4 * dim
    lookups, side = num_ids, 0
    method = base_method(method)
    if method.startswith("memrec"):
        k = opts["num_token_hashes"] * opts["num_weight_hashes"]
        lookups = num_ids * k
        side = num_ids * opts["num_weight_hashes"] * 4 + lookups * 4  # weight scalars + per-lookup weights
    elif method == "qr":
        lookups = 2 * num_ids
        side = num_ids * row  # [N, dim] product written (one-hot: pooled = product)
    elif method == "lma":
        side = num_ids * (8 * max(1, math.ceil(math.log2(max(2, index_values)))) + 4)  # binary search + row
    fwd = 8 * num_ids + lookups * row + side + num_ids * row
    train = fwd + num_ids * row + 2 * lookups * row
    return {"fwd": fwd, "train": train, "lookups": lookups}


def touch(dmp: nn.Module) -> None:
    """Read every table once (sharded tensors through their local shards)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    for p in dmp.state_dict().values():
        parts = [s.tensor for s in p.local_shards()] if isinstance(p, ShardedTensor) else [p]
        for t in parts:
            if isinstance(t, torch.Tensor) and not t.is_meta and t.numel():
                t.sum()


def time_it(fn: Callable[[int], None], warmup: int, repeats: int) -> List[float]:
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(repeats):
        t = time.perf_counter()
        fn(warmup + i)
        out.append(time.perf_counter() - t)
    return out


def step_fns(dmp: nn.Module, kjts: Sequence[KeyedJaggedTensor], grads: torch.Tensor) -> Dict[str, Callable[[int], None]]:
    def fwd(i: int) -> None:
        with torch.no_grad():
            dmp(kjts[i % len(kjts)])

    def train(i: int) -> None:
        out = dmp(kjts[i % len(kjts)])
        (out * grads).sum().backward()

    return {"fwd": fwd, "train": train}


def time_interleaved(steps: Dict[str, Dict[str, Callable[[int], None]]], warmup: int,
                     repeats: int) -> Dict[str, Dict[str, List[float]]]:
    """Per phase, round ``i`` runs step ``i`` of every method once (order rotated every round), so a load burst
    from another job hits all methods alike instead of one method's whole series; warm-up rounds untimed."""
    methods = list(steps)
    out: Dict[str, Dict[str, List[float]]] = {m: {} for m in methods}
    for phase in ("fwd", "train"):
        for m in methods:
            out[m][phase] = []
        for i in range(warmup + repeats):
            shift = i % len(methods)
            for m in methods[shift:] + methods[:shift]:
                t = time.perf_counter()
                steps[m][phase](i)
                if i >= warmup:
                    out[m][phase].append(time.perf_counter() - t)
    return out


def summary(ts: List[float]) -> Dict[str, float]:
    a = np.asarray(ts) * 1e3
    return {"median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)),
            "p90_ms": float(np.percentile(a, 90))}


def machine_info() -> Dict[str, Any]:
    info: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(), "os_cpu_count": os.cpu_count()}
    try:
        import fbgemm_gpu
        import torchrec
        info["fbgemm_gpu"] = fbgemm_gpu.__version__
        info["torchrec"] = torchrec.__version__
    except Exception as e:  # pragma: no cover
        info["import_error"] = repr(e)
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            key = line.split(":")[0].strip()
            if key in ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache", "Socket(s)"):
                info["lscpu " + key] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        info["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        info["loadavg_at_start"] = os.getloadavg()
    except (ValueError, OSError):
        pass
    return info


# ----------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> Dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch.manual_seed(0)
    results: Dict[str, Any] = {"machine": machine_info(), "args": vars(args),
                               "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": []}
    results["stream"] = stream_copy_gbs(args.stream_mib, args.stream_repeats)
    print(f"STREAM copy: {results['stream']['median_gbs']:.2f} GB/s (median)", flush=True)
    bw = results["stream"]["median_gbs"] * 1e9
    tmpdir = Path(tempfile.mkdtemp(prefix="embbench_"))
    for shape in args.shapes:
        base, scale, dim = (TB_ROWS, args.tb_scale, args.tb_dim) if shape == "tb" else \
            (KAGGLE_ROWS, args.kaggle_scale, args.kaggle_dim)
        rows = scaled_rows(base, scale)
        names = [f"cat_{i}" for i in range(len(rows))]
        ctx = SparseArchContext(names, rows, dim, torch.device("meta"))
        full_bytes = sum(rows) * dim * 4
        print(f"== shape {shape}: 1/{scale} of the tables, {sum(rows):,} rows x {dim} = {full_bytes/2**30:.2f} GiB",
              flush=True)
        for dist_name in args.dists:
            lma_index = None
            if any(base_method(m) == "lma" for m in args.methods):
                lma_index = str(tmpdir / f"lma_{shape}_{dist_name}.npz")
                t = time.perf_counter()
                build_lma_index(Path(lma_index), names, rows, dim, dist_name, args.lma_sample_rows)
                print(f"   lma index ({dist_name}) built in {time.perf_counter() - t:.1f}s", flush=True)
            rng = np.random.default_rng(123)
            batches = {b: [make_kjt(rng, names, rows, b, dist_name) for _ in range(args.distinct_batches)]
                       for b in args.batch_sizes}
            built: Dict[str, Dict[str, Any]] = {}
            for method in args.methods:
                kind, opts = method_options(method, shape, dim, lma_index)
                t = time.perf_counter()
                dmp, mem, _ = build_dmp(kind, opts, ctx, lr=args.lr)
                build_s = time.perf_counter() - t
                index_values = 0
                if base_method(method) == "lma":
                    from embeddings.lma_index import read_header
                    index_values = read_header(lma_index).values_covered
                touch(dmp)  # every row read once: first-touch page faults out of the timings
                built[method] = {"dmp": dmp, "mem": mem, "kind": kind, "opts": opts, "build_s": build_s,
                                 "index_values": index_values}
            for b in args.batch_sizes:
                kjts = batches[b]
                grads = torch.randn(b, len(names) * dim) * 1e-3
                # --no-ddp: DMP's sharded module tree itself (``dmp.module``), without the DDP wrapper DMP adds
                # for data-parallel parameters (MEM-REC's weight table); that wrapper clones the module output,
                # here the whole [B, F*dim] embedding output, in training only the logits.
                steps = {m: step_fns(built[m]["dmp"].module if args.no_ddp else built[m]["dmp"], kjts, grads)
                         for m in args.methods}
                times = time_interleaved(steps, args.warmup, args.repeats) if args.interleave else \
                    {m: {ph: time_it(fn, args.warmup, args.repeats) for ph, fn in steps[m].items()} for m in steps}
                for method in args.methods:
                    info = built[method]
                    kind, opts = info["kind"], info["opts"]
                    by = bytes_touched(method, opts, b * len(names), dim, info["index_values"])
                    rec = {"shape": shape, "scale": scale, "dim": dim, "dist": dist_name, "method": method,
                           "kind": kind, "options": {k: v for k, v in opts.items() if k != "index_path"},
                           "batch": b, "build_s": info["build_s"], "memory_bytes": info["mem"].total_bytes,
                           "full_table_bytes": full_bytes,
                           "compression": full_bytes / max(1, info["mem"].total_bytes),
                           "fwd": summary(times[method]["fwd"]), "train": summary(times[method]["train"]),
                           "bytes": by}
                    for k in ("fwd", "train"):
                        rec[k]["bw_bound_ms"] = by[k] / bw * 1e3
                        rec[k]["frac_of_bw"] = rec[k]["bw_bound_ms"] / rec[k]["median_ms"]
                    results["runs"].append(rec)
                    print(f"   {dist_name:7s} {method:12s} B={b:5d}  fwd {rec['fwd']['median_ms']:8.2f} ms "
                          f"[{rec['fwd']['p10_ms']:.2f}, {rec['fwd']['p90_ms']:.2f}]  train "
                          f"{rec['train']['median_ms']:8.2f} ms [{rec['train']['p10_ms']:.2f}, "
                          f"{rec['train']['p90_ms']:.2f}]  bw-frac fwd {rec['fwd']['frac_of_bw']:.3f}", flush=True)
            del built
    # ratios vs full within this run
    for rec in results["runs"]:
        ref = next((r for r in results["runs"] if r["method"] == "full" and r["shape"] == rec["shape"]
                    and r["dist"] == rec["dist"] and r["batch"] == rec["batch"]), None)
        if ref is not None:
            rec["speedup_vs_full"] = {k: ref[k]["median_ms"] / rec[k]["median_ms"] for k in ("fwd", "train")}
    results["loadavg_at_end"] = os.getloadavg()
    return results


def markdown(results: Dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"# Embedding-stage benchmark ({results['date_utc']})", "",
             f"CPU: {m.get('lscpu Model name')} ({m.get('lscpu CPU(s)')} logical CPUs, L3 {m.get('lscpu L3 cache')}), "
             f"torch {m['torch']} ({results['args'].get('threads') or m['torch_threads']} threads"
             f"{', methods interleaved per step' if results['args'].get('interleave') else ''}"
             f"{', sharded modules called directly (--no-ddp)' if results['args'].get('no_ddp') else ''}), fbgemm_gpu {m.get('fbgemm_gpu')}, "
             f"torchrec {m.get('torchrec')}; load average at start {m.get('loadavg_at_start')}, "
             f"at end {results.get('loadavg_at_end')}.",
             f"STREAM-style copy bandwidth: **{results['stream']['median_gbs']:.2f} GB/s** median "
             f"(max {results['stream']['max_gbs']:.2f}) over a {results['stream']['array_mib']} MiB float32 array.", "",
             "Times in ms per batch: median [p10, p90]. `x full` = full median / method median (same run). "
             "`bw` = bandwidth-bound time (bytes model / STREAM copy) / measured median.", "",
             "| shape | dist | method | memory | B | fwd ms | fwd x full | fwd bw | train ms | train x full | train bw |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        sp = r.get("speedup_vs_full", {})
        lines.append(
            f"| {r['shape']} 1/{r['scale']} d{r['dim']} | {r['dist']} | {r['method']} | "
            f"{r['memory_bytes']/2**20:,.1f} MiB ({r['compression']:,.0f}x) | {r['batch']} | "
            f"{r['fwd']['median_ms']:.2f} [{r['fwd']['p10_ms']:.2f}, {r['fwd']['p90_ms']:.2f}] | "
            f"{sp.get('fwd', float('nan')):.2f} | {r['fwd']['frac_of_bw']:.3f} | "
            f"{r['train']['median_ms']:.2f} [{r['train']['p10_ms']:.2f}, {r['train']['p90_ms']:.2f}] | "
            f"{sp.get('train', float('nan')):.2f} | {r['train']['frac_of_bw']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_speedup(results: Dict[str, Any], path: Path) -> None:
    """Speedup vs full (median / median, same run) per method and batch size, fwd and train, per id law."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if "speedup_vs_full" in r and r["method"] != "full"]
    combos = sorted({(r["shape"], r["dist"]) for r in runs})
    fig, axes = plt.subplots(len(combos), 2, figsize=(10, 3.2 * len(combos)), squeeze=False)
    methods = sorted({r["method"] for r in runs})
    batches = sorted({r["batch"] for r in runs})
    width = 0.8 / max(1, len(methods))
    for row, (shape, dname) in enumerate(combos):
        for col, phase in enumerate(("fwd", "train")):
            ax = axes[row][col]
            for i, m in enumerate(methods):
                ys = [next((r["speedup_vs_full"][phase] for r in runs if r["method"] == m and r["batch"] == b
                            and r["shape"] == shape and r["dist"] == dname), float("nan")) for b in batches]
                ax.bar([j + i * width for j in range(len(batches))], ys, width, label=m)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.axhline(3.4, color="r", lw=0.8, ls="--", label="MEM-REC claim 3.4x")
            ax.set_yscale("log")
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"B={b}" for b in batches])
            ax.set_ylabel("speedup vs full (x)")
            sc = next(r["scale"] for r in runs if r["shape"] == shape)
            ax.set_title(f"{shape} 1/{sc}, {dname} ids, {phase}", fontsize=9)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Embedding stage on CPU (fbgemm TBE, 1 process, shared 2-core machine)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--shapes", type=csv, default=["tb", "kaggle"], help="tb,kaggle")
    p.add_argument("--tb-scale", type=int, default=64, help="CriteoTB table rows divided by this")
    p.add_argument("--tb-dim", type=int, default=128)
    p.add_argument("--kaggle-scale", type=int, default=4, help="Kaggle table rows divided by this")
    p.add_argument("--kaggle-dim", type=int, default=16)
    p.add_argument("--methods", type=csv, default=["full", "memrec", "memrec_k2", "lma", "robe", "hash", "qr"])
    p.add_argument("--dists", type=csv, default=["zipf", "uniform"])
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048, 8192])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--distinct-batches", type=int, default=4)
    p.add_argument("--lma-sample-rows", type=int, default=125_000)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--stream-mib", type=int, default=512)
    p.add_argument("--stream-repeats", type=int, default=10)
    p.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="time each method's whole series in turn (default: round-robin over methods per step)")
    p.add_argument("--no-ddp", action="store_true",
                   help="time dmp.module (the sharded modules) instead of the DMP wrapper: skips the DDP wrapper "
                        "around data-parallel tables (MEM-REC's weight table), which clones the [B, F*dim] output "
                        "(in training it only clones the logits)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's); 1 keeps timings stable when another job "
                        "holds one of a 2-core machine's cores (2-thread OpenMP regions then stall on the busy core)")
    p.add_argument("--out", default="benchmarks/results/embedding_stage")
    p.add_argument("--quick", action="store_true", help="tiny sizes, < 1 minute")
    p.add_argument("--plot-from", default=None, help="only redraw --plot from this results JSON")
    p.add_argument("--plot", default=None, help="write the speedup plot here (e.g. docs/img/embedding_speedup.png)")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.tb_scale, args.tb_dim = ["tb"], 1024, 64
        args.batch_sizes, args.repeats, args.warmup, args.dists = [512], 5, 1, ["zipf"]
        args.lma_sample_rows, args.stream_mib, args.stream_repeats = 10_000, 64, 3
        if args.out == "benchmarks/results/embedding_stage":
            args.out = "benchmarks/results/embedding_stage_quick"
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    logging.getLogger("torch").setLevel(logging.ERROR)
    args = parse(argv)
    if args.plot_from:
        plot_speedup(json.loads(Path(args.plot_from).read_text()), Path(args.plot or "docs/img/embedding_speedup.png"))
        return
    results = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    if args.plot:
        plot_speedup(results, Path(args.plot))


if __name__ == "__main__":
    main()
