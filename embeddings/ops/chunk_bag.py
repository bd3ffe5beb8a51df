"""The embedding stage of the hashed chunk-table methods as registered torch operators: hot-row lookup, salted
hashes, chunk addresses, gather and pooling in one pass over a batch's ids (``compactrec::chunk_bag_forward``), and
the backward that sums the gradient of every touched row and applies the fused optimizer in place
(``compactrec::chunk_bag_backward``: SGD, Adagrad, row-wise Adagrad, fbgemm's TBE update; fp16 / bf16 tables updated in
float32 and stored stochastically rounded, ``embeddings.ops.rounding``).

One shape covers the hashing trick (``C = 1`` chunk of ``dim`` floats, one table per feature), ROBE-Z (``C`` chunks
of ``Z`` floats, one table per feature group, any ``Z``) and LMA (its dictionary's chunk addresses computed first
and passed as ``addresses``)::

    chunk_bag_forward(weights [T x [R_t, Z]], values [N], lengths [F * B] (feature-major KJT),
                      table_of_feature [F], salts [F, C], rows [F], addresses None | [N, C],
                      hot_keys, hot_slots, hot_starts, hot_values, hot_salts, hot_shift, hot_base [F],
                      num_chunks C, pooling 0 sum | 1 mean) -> (out [B, F * C * Z] float32, addresses [N, C])

    row(f, x, c) = hot_base[f] + C * index          + c   where x is feature f's hot value number ``index``
                 = unsigned(mix64(x ^ salts[f, c])) mod rows[f]                  otherwise (embeddings.hashing)
    out[b, (f * C + c) * Z : +Z] = pool over the ids x of bag (f, b) of weights[table_of_feature[f]][row(f, x, c)]

Kernels: C++ on CPU (``embeddings/ops/csrc/chunk_bag.cpp``, in :mod:`embeddings.ops.library`, threads follow
``torch.set_num_threads``); the torch ops below on every other device (CUDA) and on CPU where the C++ library
cannot be built (logged once): the same maths, the reference the tests hold the C++ kernels to; fake kernels for
``torch.export``. :func:`lookup` adds autograd: the fused optimizer where the tables carry one
(``torchrec.optim.apply_optimizer_in_backward``, as the trainer attaches), else a dense gradient.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from embeddings.hot_rows import find_hot, reference_slots, slot_capacity
from embeddings.ops import library, rounding
from embeddings.ops import salted_hash as fused_hash

logger = logging.getLogger(__name__)

OPTIMIZERS = {"sgd": 1, "adagrad": 2, "rowwise_adagrad": 3}
_lock = threading.Lock()
_state: Dict[str, bool] = {}
_warned: set = set()


# ---- the torch reference (every device) -------------------------------------------------------------------
def _bag_index(lengths: torch.Tensor, num_features: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(feature of every value, bag of every value, B) of a feature-major KJT's lengths."""
    lengths = lengths.to(torch.int64)
    batch = lengths.numel() // num_features
    n = int(lengths.sum())
    bags = torch.arange(lengths.numel(), dtype=torch.int64, device=lengths.device)
    bag = torch.repeat_interleave(bags, lengths, output_size=n)
    return bag // batch, bag, batch


def torch_addresses(values: torch.Tensor, feature: torch.Tensor, salts: torch.Tensor, rows: torch.Tensor,
                    hot_keys: Optional[torch.Tensor], hot_starts: Optional[torch.Tensor],
                    hot_values: Optional[torch.Tensor], hot_salts: Optional[torch.Tensor], hot_shift: int,
                    hot_base: Optional[torch.Tensor], num_chunks: int) -> torch.Tensor:
    """Rows [N, C] of every chunk of every id (the forward's address maths in torch ops)."""
    addr = fused_hash._torch_kernel(values, feature, salts, rows)
    if hot_keys is not None and hot_keys.numel():
        assert hot_starts is not None and hot_base is not None
        hit, index = find_hot(hot_keys, hot_starts, values, feature, hot_shift, hot_values, hot_salts)
        chunk = torch.arange(num_chunks, dtype=torch.int64, device=values.device)[None, :]
        hot_rows = (hot_base[feature] + num_chunks * index)[:, None] + chunk
        addr = torch.where(hit[:, None], hot_rows, addr)
    return addr


def _torch_forward(weights: List[torch.Tensor], values: torch.Tensor, lengths: torch.Tensor,
                   table_of_feature: torch.Tensor, salts: Optional[torch.Tensor], rows: Optional[torch.Tensor],
                   addresses: Optional[torch.Tensor], hot_keys: Optional[torch.Tensor],
                   hot_slots: Optional[torch.Tensor], hot_starts: Optional[torch.Tensor],
                   hot_values: Optional[torch.Tensor], hot_salts: Optional[torch.Tensor], hot_shift: int,
                   hot_base: Optional[torch.Tensor], num_chunks: int, pooling: int) -> Tuple[torch.Tensor, torch.Tensor]:
    if values.device.type != "cpu" and values.device.type not in _warned:
        _warned.add(values.device.type)
        logger.info("compactrec::chunk_bag_forward: no native %s kernel; running its torch ops there",
                    values.device.type)
    num_features, chunks, width = table_of_feature.numel(), num_chunks, weights[0].shape[1]
    feature, bag, batch = _bag_index(lengths, num_features)
    values = values.to(torch.int64)
    if addresses is None:
        if salts is None or rows is None:
            raise ValueError("compactrec::chunk_bag_forward: without addresses, salts and rows are needed")
        addresses = torch_addresses(values, feature, salts, rows, hot_keys, hot_starts, hot_values, hot_salts,
                                    hot_shift, hot_base, chunks)
    table = table_of_feature[feature]
    emb = torch.zeros(values.numel(), chunks, width, dtype=torch.float32, device=values.device)
    for t, w in enumerate(weights):
        mask = table == t
        if bool(mask.any()):
            picked = addresses[mask]
            if bool(((picked < 0) | (picked >= w.shape[0])).any()):
                raise ValueError(f"compactrec::chunk_bag_forward: an id addresses a row outside table {t} "
                                 f"({w.shape[0]} rows)")
            emb[mask] = w[picked].float()
    pooled = torch.zeros(lengths.numel(), chunks * width, dtype=torch.float32, device=values.device)
    pooled.index_add_(0, bag, emb.view(-1, chunks * width))
    if pooling == 1:
        pooled = pooled / lengths.to(torch.float32).clamp(min=1)[:, None]
    out = pooled.view(num_features, batch, chunks * width).permute(1, 0, 2).reshape(batch, -1)
    return out, addresses


def pair_gradients(grad_out: torch.Tensor, lengths: torch.Tensor, num_features: int, num_chunks: int,
                   pooling: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(gradient of every lookup [N, C, Z], feature of every id [N]) from the output gradient."""
    feature, bag, batch = _bag_index(lengths, num_features)
    sample = bag - feature * batch
    width = grad_out.shape[1] // (num_features * num_chunks)
    g = grad_out.view(batch, num_features, num_chunks, width)[sample, feature]
    if pooling == 1:  # times the float32 reciprocal, as the kernel scales
        count = lengths.to(torch.int64)[bag].to(torch.float32)
        g = g * (torch.ones_like(count) / count)[:, None, None]
    return g, feature


def _torch_backward(weights: List[torch.Tensor], states: List[torch.Tensor], grad_out: torch.Tensor,
                    addresses: torch.Tensor, lengths: torch.Tensor, table_of_feature: torch.Tensor,
                    num_chunks: int, pooling: int, optimizer: int, lr: float, eps: float, weight_decay: float,
                    scratch: List[torch.Tensor], rounding_seed: int = 0) -> None:
    """The C++ backward's maths: each touched row's gradient summed over its lookups in the kernel's order (sample by
    sample, then feature, id and chunk), then one float32 update per row (:func:`embeddings.ops.rounding.update_rows`,
    stochastically rounded for fp16 / bf16 tables)."""
    num_features = table_of_feature.numel()
    g, feature = pair_gradients(grad_out, lengths, num_features, num_chunks, pooling)
    _, bag, batch = _bag_index(lengths, num_features)
    order = torch.sort((bag % batch) * num_features + feature, stable=True)[1]  # sample-major, ids kept in order
    g, feature = g[order], feature[order]
    table = table_of_feature[feature][:, None].expand(-1, num_chunks).reshape(-1)
    g = g.reshape(-1, g.shape[-1]).to(torch.float32)
    rows = addresses[order].reshape(-1)
    states = list(states) if optimizer >= 2 else [None] * len(weights)  # type: ignore[list-item]
    for t, w in enumerate(weights):
        mask = table == t
        if not bool(mask.any()):
            continue
        unique, inverse = torch.unique(rows[mask], return_inverse=True)
        summed = torch.zeros(unique.numel(), w.shape[1], dtype=torch.float32, device=w.device)
        summed.index_add_(0, inverse, g[mask])  # in order on CPU: the kernel's sums, bit for bit
        rounding.update_rows(w, states[t], unique, summed, optimizer, lr, eps, weight_decay, rounding_seed, t)


def _torch_hot_slots(keys: torch.Tensor, capacity: int) -> torch.Tensor:
    if capacity != slot_capacity(keys.numel()):
        raise ValueError(f"compactrec::hot_slots: capacity {capacity} is not slot_capacity({keys.numel()})")
    return torch.from_numpy(reference_slots(keys.cpu().numpy())).to(keys.device)


# ---- fake kernels (torch.export, meta) --------------------------------------------------------------------
def _fake_forward(weights: List[torch.Tensor], values: torch.Tensor, lengths: torch.Tensor,
                  table_of_feature: torch.Tensor, salts: Optional[torch.Tensor], rows: Optional[torch.Tensor],
                  addresses: Optional[torch.Tensor], *args: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    num_chunks = args[-2]
    num_features = table_of_feature.shape[0]
    batch = lengths.shape[0] // num_features
    out = values.new_empty((batch, num_features * num_chunks * weights[0].shape[1]), dtype=torch.float32)
    return out, values.new_empty((values.shape[0], num_chunks))


def _fake_backward(*args: Any) -> None:
    return None


def _fake_hot_slots(keys: torch.Tensor, capacity: int) -> torch.Tensor:
    return keys.new_empty((capacity,), dtype=torch.int32)


def ensure_ops() -> bool:
    """Register the chunk-bag operators in this process (once); True when their C++ CPU kernels run."""
    if "native" in _state:
        return _state["native"]
    with _lock:
        if "native" in _state:
            return _state["native"]
        native = library.ensure_library()
        fused_hash.ensure_op()
        lib = library.library()
        lib.impl("chunk_bag_forward", _torch_forward, "CompositeExplicitAutograd")
        lib.impl("chunk_bag_backward", _torch_backward, "CompositeExplicitAutograd")
        lib.impl("hot_slots", _torch_hot_slots, "CompositeExplicitAutograd")
        torch.library.register_fake("compactrec::chunk_bag_forward", _fake_forward, lib=lib)
        torch.library.register_fake("compactrec::chunk_bag_backward", _fake_backward, lib=lib)
        torch.library.register_fake("compactrec::hot_slots", _fake_hot_slots, lib=lib)
        _state["native"] = native
    return native


# ---- the module-facing API --------------------------------------------------------------------------------
@dataclass
class BagArgs:
    """Everything but the tables and the ids a lookup needs (a layout's buffers, see ``embeddings.chunk_table``)."""

    table_of_feature: torch.Tensor
    num_chunks: int
    pooling: int  # 0 sum, 1 mean
    salts: Optional[torch.Tensor] = None
    rows: Optional[torch.Tensor] = None
    hot_keys: Optional[torch.Tensor] = None
    hot_slots: Optional[torch.Tensor] = None
    hot_starts: Optional[torch.Tensor] = None
    hot_values: Optional[torch.Tensor] = None
    hot_salts: Optional[torch.Tensor] = None
    hot_shift: int = 1
    hot_base: Optional[torch.Tensor] = None


def forward(weights: Sequence[torch.Tensor], values: torch.Tensor, lengths: torch.Tensor, args: BagArgs,
            addresses: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The operator call, no autograd: (out [B, F * C * Z], addresses [N, C])."""
    ensure_ops()
    return torch.ops.compactrec.chunk_bag_forward(
        list(weights), values.to(torch.int64), lengths, args.table_of_feature, args.salts, args.rows, addresses,
        args.hot_keys, args.hot_slots, args.hot_starts, args.hot_values, args.hot_salts, args.hot_shift,
        args.hot_base, args.num_chunks, args.pooling)


@dataclass
class FusedUpdate:
    """A fused optimizer step: code (:data:`OPTIMIZERS`), hyper-parameters, per-table state and scratch maps."""

    optimizer: int
    lr: float
    eps: float
    weight_decay: float
    states: List[torch.Tensor]
    scratch: List[torch.Tensor]
    group: Any = None  # a process group: the tables are replicas, updated with every rank's lookups (replicate())


def _float32_state(optimizer: Any, weight: torch.Tensor) -> torch.Tensor:
    """The optimizer's ``sum`` state of ``weight``, made float32 in place in the optimizer (torch creates it in the
    table's dtype: fp16 for fp16 tables; the fused update keeps float32 state, as fbgemm's TBE does)."""
    state = optimizer.state[weight]["sum"]
    if state.dtype != torch.float32:
        state = state.to(torch.float32)
        optimizer.state[weight]["sum"] = state
    return state


def fused_update_of(weights: Sequence[torch.nn.Parameter]) -> Optional[FusedUpdate]:
    """The fused update the trainer attached to ``weights`` (``apply_optimizer_in_backward``), or None when they
    have none (a dense gradient is then returned). Raises for an in-backward optimizer this kernel lacks."""
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad  # noqa: PLC0415 - torchrec is heavy; only here

    if not all(hasattr(w, "_in_backward_optimizers") for w in weights):
        if any(hasattr(w, "_in_backward_optimizers") for w in weights):
            raise ValueError("compactrec::chunk_bag: some tables carry an in-backward optimizer and some do not")
        return None
    codes, states = [], []
    for w in weights:
        optimizer = w._in_backward_optimizers[0]  # type: ignore[attr-defined]
        group = optimizer.param_groups[0]
        if isinstance(optimizer, RowWiseAdagrad):
            code, state = 3, _float32_state(optimizer, w)
        elif isinstance(optimizer, torch.optim.Adagrad):
            code, state = 2, _float32_state(optimizer, w)
        elif isinstance(optimizer, torch.optim.SGD):
            if group.get("momentum", 0) or group.get("weight_decay", 0):
                raise ValueError("compactrec::chunk_bag: fused SGD takes no momentum and no weight decay (as fbgemm's)")
            code, state = 1, None
        else:
            raise ValueError(f"compactrec::chunk_bag: no fused update for {type(optimizer).__name__}; use SGD, "
                             "Adagrad or RowWiseAdagrad, or kernel: tbe")
        codes.append((code, float(group["lr"]), float(group.get("eps", 0.0)), float(group.get("weight_decay", 0.0))))
        if state is not None:
            states.append(state)
    if len(set(codes)) != 1:
        raise ValueError(f"compactrec::chunk_bag: the tables of one module carry different optimizers {codes}")
    code, lr, eps, weight_decay = codes[0]
    scratch = [getattr(w, "_compactrec_scratch", None) for w in weights]
    for i, (w, s) in enumerate(zip(weights, scratch)):
        if s is None or s.numel() != w.shape[0]:
            s = torch.full((w.shape[0],), -1, dtype=torch.int32, device=w.device)
            w._compactrec_scratch = s  # type: ignore[attr-defined]
            scratch[i] = s
    groups = {id(getattr(w, "_compactrec_group", None)) for w in weights}
    if len(groups) != 1:
        raise ValueError("compactrec::chunk_bag: the tables of one module are replicated over different groups")
    group = getattr(weights[0], "_compactrec_group", None)
    return FusedUpdate(code, lr, eps, weight_decay, states, scratch, group)  # type: ignore[arg-type]


def replicate(weights: Sequence[torch.nn.Parameter], group: Any) -> None:
    """Make ``weights`` replicas over ``group`` (a ``torch.distributed`` process group, or None to undo): each
    backward all-gathers every rank's addresses and output gradients and applies the fused update for the union of
    the ranks' lookups, scaled by 1 / world size (the gradient of the mean of the ranks' losses, as DDP averages),
    in rank order, so that every replica takes the same step and stays equal: one fused call per rank instead of a
    dense all-reduce of the tables' gradient. The replicas must start equal (broadcast them first)."""
    for w in weights:
        w._compactrec_group = group  # type: ignore[attr-defined]


def gather_union(group: Any, grad: torch.Tensor, addresses: torch.Tensor, lengths: torch.Tensor,
                 num_features: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's (output gradient, addresses, lengths) as one feature-major batch: for each feature, rank 0's
    bags then rank 1's ...; the output gradient scaled by 1 / world size."""
    import torch.distributed as dist  # noqa: PLC0415 - only replicated tables need it

    world = dist.get_world_size(group)
    lengths = lengths.to(torch.int64)
    sizes = torch.tensor([addresses.shape[0], lengths.numel() // num_features], dtype=torch.int64)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    max_n = max(int(t[0]) for t in all_sizes)
    max_b = max(int(t[1]) for t in all_sizes)
    chunks, width = addresses.shape[1], grad.shape[1]

    def gathered(local: torch.Tensor, shape: Tuple[int, ...]) -> List[torch.Tensor]:
        padded = local.new_zeros(shape)
        padded[: local.shape[0]] = local
        out = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(out, padded, group=group)
        return out

    grads = gathered(grad, (max_b, width))
    addrs = gathered(addresses, (max_n, chunks))
    lens = gathered(lengths.view(num_features, -1).t().contiguous(), (max_b, num_features))  # batch-major to pad
    union_grad, union_addr, union_len = [], [], []
    per_rank = []
    for r, t in enumerate(all_sizes):
        n, b = int(t[0]), int(t[1])
        rank_lengths = lens[r][:b].t()  # [F, b]
        per_rank.append((addrs[r][:n].split(rank_lengths.sum(1).tolist()), rank_lengths))
        union_grad.append(grads[r][:b])
    for f in range(num_features):
        for parts, rank_lengths in per_rank:
            union_addr.append(parts[f])
            union_len.append(rank_lengths[f])
    return (torch.cat(union_grad) / world, torch.cat(union_addr).contiguous(), torch.cat(union_len))


def next_rounding_seed(weight: torch.Tensor) -> int:
    """The rounding stream of this backward call of ``weight``'s tables: a per-table counter of fused updates, the
    same on every replica (fp16 / bf16 tables; ``embeddings.ops.rounding``). It is not checkpointed: a resumed run
    restarts it at 0, which keeps the rounding unbiased but not bit-identical to an uninterrupted run."""
    step = int(getattr(weight, "_compactrec_rounding_step", 0))
    weight._compactrec_rounding_step = step + 1  # type: ignore[attr-defined]
    return step


class _ChunkBag(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, lengths: torch.Tensor, args: BagArgs,
                addresses: Optional[torch.Tensor], update: Optional[FusedUpdate], *weights: torch.Tensor) -> torch.Tensor:
        out, addr = forward([w.detach() for w in weights], values, lengths, args, addresses)
        ctx.save_for_backward(addr, lengths)
        ctx.args, ctx.update, ctx.weights = args, update, weights
        ctx.mark_non_differentiable(addr)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        addr, lengths = ctx.saved_tensors
        args, update = ctx.args, ctx.update
        grad = grad.contiguous().float()
        tables = [w.detach() for w in ctx.weights]
        if update is not None:
            if update.group is not None:
                grad, addr, lengths = gather_union(update.group, grad, addr, lengths, args.table_of_feature.numel())
            torch.ops.compactrec.chunk_bag_backward(
                tables, update.states, grad, addr, lengths, args.table_of_feature, args.num_chunks, args.pooling,
                update.optimizer, update.lr, update.eps, update.weight_decay, update.scratch,
                next_rounding_seed(ctx.weights[0]))
            return (None, None, None, None, None) + (None,) * len(tables)
        g, feature = pair_gradients(grad, lengths, args.table_of_feature.numel(), args.num_chunks, args.pooling)
        table = args.table_of_feature[feature][:, None].expand(-1, args.num_chunks).reshape(-1)
        g, rows = g.reshape(-1, g.shape[-1]), addr.reshape(-1)
        grads = []
        for t, w in enumerate(tables):
            mask = table == t
            grads.append(torch.zeros_like(w).index_add_(0, rows[mask], g[mask].to(w.dtype)))
        return (None, None, None, None, None) + tuple(grads)


def lookup(weights: Sequence[torch.Tensor], values: torch.Tensor, lengths: torch.Tensor, args: BagArgs,
           addresses: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, F * C * Z]`` pooled embeddings with autograd: where the tables require grad, their backward runs the
    fused optimizer attached to them (in place, no gradient) or returns a dense gradient."""
    if not torch.is_grad_enabled() or not any(w.requires_grad for w in weights):
        return forward(weights, values, lengths, args, addresses)[0]
    update = fused_update_of(weights)  # type: ignore[arg-type]
    return _ChunkBag.apply(values, lengths, args, addresses, update, *weights)


def available() -> bool:
    """Whether the C++ kernels run in this process (builds them on first call)."""
    return ensure_ops()


__all__ = ["BagArgs", "FusedUpdate", "OPTIMIZERS", "available", "ensure_ops", "forward", "fused_update_of",
           "gather_union", "lookup", "next_rounding_seed", "replicate", "torch_addresses"]
