"""The method variants of ``embedding_stage.py`` and how each is built, exactly as the trainer builds it.

A variant is ``<method>[+<modifier>...]``:

- ``<method>``: ``full``, ``memrec`` (released CriteoTB setting, K = kw = 1), ``memrec_k2`` (K = 2), ``lma``,
  ``robe``, ``robe_c4`` (4 chunks per id: Z = dim / 4), ``hash``, ``qr``; a ``_fused`` suffix adds ``hash_backend: fused`` (one-pass C hashing).
- ``+weighted``: MEM-REC's weighted lookup with learned weights for every batch (the factored path off).
- ``+rowwise``: the inner tables row_wise even on one rank (the placement before issue 13; the default is now
  table_wise on a single rank, where row-wise only adds bucketization and a reduce-scatter).
- ``+dp``: the inner tables data_parallel on the dense kernel (replicated; dense gradient, dense update).
- ``+b100``: sized by one byte budget of 1/100 of the full tables (``budget: 0.01``) instead of the fixed sizes;
  ``+b10`` and ``+b1000``: 1/10 and 1/1000.
- ``+hot``: half of that budget on hot rows (``hot_share: 0.5``; exact rows for each feature's most frequent
  ids, counted on a separate sample of the benchmark's own id law); needs a budget.
- ``+local``: the unsharded module, not wrapped by DMP, with the trainer's fused sparse optimizer attached: its
  whole embedding stage and update run on the fused operator (``embeddings.ops.chunk_bag``, ``kernel: auto``);
  hash, robe and lma only. Without it a compressed module runs TorchRec's sharded path (fbgemm TBE).

Every variant gets the trainer's fused sparse optimizer (SGD in the benchmark) and is wrapped by TorchRec's
``DistributedModelParallel`` (world size 1, gloo, CPU) with the method's sharders and constraints. Parameters not
optimised in backward (MEM-REC's weight table, data-parallel tables) get a dense SGD step in ``train``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings import registry
from embeddings.types import SparseArchContext, TopologyInfo
from trainer.config import OptimizerConfig
from trainer.train.optim import apply_sparse_optimizer
from trainer.strict import from_dict
from sharding.sharders import sharders_for
from variants import sized_options, variant as method_variant  # benchmarks/ is on sys.path when a benchmark runs

FUSED_SUFFIX = "_fused"
BUDGETS = {"b10": 0.1, "b100": 0.01, "b1000": 0.001}
MODIFIERS = ("weighted", "rowwise", "dp", *BUDGETS, "hot", "local")
SIZE_OPTIONS = ("num_token_rows", "num_weight_rows", "memory_fraction", "num_rows", "num_collisions")


@dataclass(frozen=True)
class Variant:
    name: str  # as given on the command line
    method: str  # without modifiers, e.g. memrec_fused
    modifiers: Tuple[str, ...]

    @property
    def base(self) -> str:
        """The method without ``_fused`` (e.g. ``memrec``)."""
        return self.method[: -len(FUSED_SUFFIX)] if self.method.endswith(FUSED_SUFFIX) else self.method


def parse_variant(name: str) -> Variant:
    method, *mods = name.split("+")
    bad = [m for m in mods if m not in MODIFIERS]
    if bad:
        raise ValueError(f"method {name!r}: unknown modifier(s) {bad}; known: {', '.join(MODIFIERS)}")
    return Variant(name, method, tuple(mods))


def base_method(method: str) -> str:
    return parse_variant(method).base


def method_options(method: str, shape: str, dim: int, lma_index: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """(registry kind, options dict) of a variant; ``<method>_fused`` adds ``hash_backend: fused``, ``+b100`` and
    ``+hot`` replace the size options by a byte budget (with hot rows)."""
    variant = parse_variant(method)
    kind, opts = _method_options(variant.method, shape, dim, lma_index)
    budgets = [BUDGETS[m] for m in variant.modifiers if m in BUDGETS]
    if "hot" in variant.modifiers and not budgets:
        raise ValueError(f"method {method!r}: +hot needs a budget (+b10, +b100, +b1000: hot rows are a share of it)")
    if budgets:
        if kind == "full":
            raise ValueError(f"method {method!r}: full has no budget")
        opts = {k: v for k, v in opts.items() if k not in SIZE_OPTIONS}
        opts["budget"] = budgets[0]
        if "hot" in variant.modifiers:
            opts["hot_share"] = 0.5
    return kind, opts


def _method_options(method: str, shape: str, dim: int, lma_index: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    if method.endswith(FUSED_SUFFIX):
        kind, opts = _method_options(method[: -len(FUSED_SUFFIX)], shape, dim, lma_index)
        if kind == "full":
            raise ValueError("full has no id hashing (no _fused variant)")
        return kind, {**opts, "hash_backend": "fused"}
    kind = method_variant(method).kind
    opts = sized_options(method, dim)
    if kind == "lma":
        opts["index_path"] = lma_index
    return kind, opts


def build_lma_index(path: Path, names: Sequence[str], rows: Sequence[int], dist_name: str, sample_rows: int,
                    sample_ids: Any, seed: int = 0) -> None:
    """An index artifact from ``sample_rows`` synthetic rows (same id law as the benchmark batches), built
    with the trainer's accumulator (``embeddings.lma_build.build_index`` minus the data loader)."""
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


class Local(nn.Module):
    """The unsharded model in the place of DMP (``.module`` is the model, as DMP's is)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.module(kjt)


def _placement(constraints: Dict[str, Any], modifiers: Sequence[str]) -> None:
    """Apply ``+rowwise`` / ``+dp`` to the method's default constraints (in place)."""
    for c in constraints.values():
        if c.sharding_types == ["table_wise"] and "rowwise" in modifiers:
            c.sharding_types = ["row_wise"]
        if c.sharding_types and c.sharding_types[0] in ("table_wise", "row_wise") and "dp" in modifiers:
            c.sharding_types, c.compute_kernels = ["data_parallel"], ["dense"]


@dataclass
class Built:
    dmp: nn.Module  # DistributedModelParallel, or Local for +local
    memory: Any
    placement: Dict[str, str]  # table -> sharding type
    dense_optimizer: Optional[torch.optim.Optimizer]  # over parameters not optimised in backward


def build_dmp(method: str, opts: Dict[str, Any], ctx: SparseArchContext, lr: float,
              kind: Optional[str] = None) -> Built:
    variant = parse_variant(method)
    kind = kind or method_options(method, "tb", ctx.embedding_dim, opts.get("index_path"))[0]
    spec = registry.get(kind)
    options = from_dict(spec.options_type, opts)
    if "local" in variant.modifiers:  # no DMP to materialise it: built on the CPU
        ctx = dataclasses.replace(ctx, device=torch.device("cpu"))
    module = spec.build(ctx, options)
    mem = spec.memory(module, ctx, options, "sgd")
    apply_sparse_optimizer(module, OptimizerConfig(sparse="sgd", sparse_lr=lr))
    sharders = sharders_for(module)
    constraints = spec.default_constraints(module, options, TopologyInfo(1, 1, "cpu"))
    _placement(constraints, variant.modifiers)
    model = Wrapper(module)
    if "local" in variant.modifiers:
        if not getattr(module, "uses_fused_kernel", lambda d: False)(torch.device("cpu")):
            raise ValueError(f"method {method!r}: +local needs a module on the fused operator (hash, robe, lma with "
                             "the C++ library built)")
        dense = [p for _, p in in_backward_optimizer_filter(model.named_parameters()) if p.requires_grad]
        return Built(Local(model), mem, {"all": "local (fused operator)"},
                     torch.optim.SGD(dense, lr=lr) if dense else None)
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints)
    plan = planner.plan(model, sharders)
    dmp = DistributedModelParallel(module=model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    if "weighted" in variant.modifiers:
        if kind != "memrec":
            raise ValueError(f"method {method!r}: +weighted applies to memrec only")
        dmp.module.sparse.factored_weights = False
    dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters()) if p.requires_grad]
    placement = {t: ps.sharding_type for m in plan.plan.values() for t, ps in m.items()}  # type: ignore[union-attr]
    return Built(dmp, mem, placement, torch.optim.SGD(dense, lr=lr) if dense else None)


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


def variant_names(methods: List[str]) -> List[str]:
    """Validate every name (errors name the bad one) and return them."""
    for m in methods:
        method_options(m, "tb", 128, None)
    return methods
