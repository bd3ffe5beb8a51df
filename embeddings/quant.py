"""Inference embedding modules on fbgemm's inference TBE (``IntNBitTableBatchedEmbeddingBagsCodegen``), every method.

Every method of this package is *id maths -> an inner EmbeddingBagCollection -> finish*: ``full`` is one table
per feature (the id maths is ``id mod rows``), ``hash``/``robe``/``lma``/``qr`` are a
``RemappedEmbeddingBagCollection`` (``layout.expand`` -> ``.ebc`` -> ``layout.finish``), MEM-REC is a
``MemRecModuleBase`` (``expand`` -> ``weigh`` -> ``.token_ebc`` -> ``finish``). The inference form keeps the
method's own module and id maths and swaps only the inner EBC for TorchRec's quantized
``torchrec.quant.embedding_modules.EmbeddingBagCollection`` over the *same table configs*, whose lookups run on
fbgemm's inference TBE at ``fp32``, ``fp16``, ``int8`` or ``int4`` (row-wise scale and shift in fp16 for the
integer types). Anything the layout keeps as a buffer (salts, the LMA dictionary, hot-id keys) comes along
unchanged, so a method's whole behaviour carries over and only the table precision changes.

:func:`split_sparse` takes a trained (float) sparse module apart into :class:`SparseParts` - plain tensors, table
configs and, in process, the layout object - and :func:`build_sparse` puts the inference module together from them
on any device, without building a float table. An artifact (``trainer.serve.export``) stores the parts but the
layout: it stores the method's state as tensors instead (``SparseParts.state``, from the spec's
``InferenceHooks``), and loading rebuilds the layout from the config (``embeddings.inference_state``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingBagCollectionInterface
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
from torchrec.types import DataType


logger = logging.getLogger(__name__)

# precision name -> (TorchRec data type, bits per element); what fbgemm 1.8's CPU inference TBE runs and we test
PRECISIONS: Dict[str, DataType] = {"fp32": DataType.FP32, "fp16": DataType.FP16, "int8": DataType.INT8,
                                   "int4": DataType.INT4}
BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}
CHUNK_ROWS = 1 << 18  # rows quantized at a time: bounds the float copy a large table needs


def check_precision(precision: str, source: str = "precision") -> str:
    """``precision`` if the inference kernel has it, else a ValueError naming what it has."""
    if precision not in PRECISIONS:
        raise ValueError(f"{source} {precision!r} is not a table precision of fbgemm's inference TBE here; "
                         f"choose one of {', '.join(PRECISIONS)}")
    return precision


def check_dims(configs: List[EmbeddingBagConfig], precision: str) -> None:
    """Integer rows are packed per byte: an int4 table needs an even width."""
    per_byte = 8 // BITS[precision] if BITS[precision] < 8 else 1
    bad = [f"{c.name} (dim {c.embedding_dim})" for c in configs if c.embedding_dim % per_byte]
    if bad:
        raise ValueError(f"precision {precision} packs {per_byte} values per byte; tables {', '.join(bad)} have a "
                         f"width that is not a multiple of {per_byte}")


# ---- quantized rows -----------------------------------------------------------------------------------------
def quantize_rows(rows: torch.Tensor, precision: str) -> Dict[str, Optional[torch.Tensor]]:
    """Float rows [n, dim] -> fbgemm's inference layout: ``weight`` uint8 [n, dim * bits / 8] and, for the
    integer types, ``scale_shift`` uint8 [n, 4] (fp16 scale, fp16 shift per row)."""
    if precision == "fp32":
        return {"weight": rows.float().contiguous().view(torch.uint8), "scale_shift": None}
    if precision == "fp16":
        return {"weight": rows.half().contiguous().view(torch.uint8), "scale_shift": None}
    packed = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(rows.float().contiguous(), BITS[precision])
    return {"weight": packed[:, :-4].contiguous(), "scale_shift": packed[:, -4:].contiguous()}


def quantize_into(weight: torch.Tensor, scale_shift: Optional[torch.Tensor], precision: str,
                  rows_of: Callable[[int, int], torch.Tensor], chunk_rows: int = CHUNK_ROWS) -> None:
    """Fill ``weight`` (uint8 [n, dim * bits / 8]) and ``scale_shift`` (uint8 [n, 4], integer types) with the
    quantized ``rows_of(start, stop)`` float rows, ``chunk_rows`` at a time: the table never exists in float at
    once (one too large for memory in fp32 can still be built at int8)."""
    for start in range(0, weight.shape[0], chunk_rows):
        stop = min(weight.shape[0], start + chunk_rows)
        part = quantize_rows(rows_of(start, stop), precision)
        part_weight, part_scale_shift = part["weight"], part["scale_shift"]
        assert part_weight is not None
        weight[start:stop] = part_weight
        if scale_shift is not None and part_scale_shift is not None:
            scale_shift[start:stop] = part_scale_shift


def quantize_table(num_rows: int, dim: int, precision: str, rows_of: Callable[[int, int], torch.Tensor],
                   chunk_rows: int = CHUNK_ROWS) -> Dict[str, Optional[torch.Tensor]]:
    """A whole table, quantized by :func:`quantize_into` into new tensors."""
    weight = torch.empty(num_rows, dim * BITS[precision] // 8, dtype=torch.uint8)
    scale_shift = torch.empty(num_rows, 4, dtype=torch.uint8) if BITS[precision] < 16 else None
    quantize_into(weight, scale_shift, precision, rows_of, chunk_rows)
    return {"weight": weight, "scale_shift": scale_shift}


def table_bytes(table: Dict[str, Optional[torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for t in table.values() if t is not None)


# ---- configs as plain data (what an artifact stores) ---------------------------------------------------------
def config_dict(config: EmbeddingBagConfig) -> Dict[str, Any]:
    return {"name": config.name, "embedding_dim": int(config.embedding_dim),
            "num_embeddings": int(config.num_embeddings), "feature_names": list(config.feature_names),
            "pooling": config.pooling.value}


def config_from_dict(data: Dict[str, Any], precision: str) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(name=data["name"], embedding_dim=data["embedding_dim"],
                              num_embeddings=data["num_embeddings"], feature_names=list(data["feature_names"]),
                              pooling=PoolingType(data["pooling"]), data_type=PRECISIONS[precision])


Rows = Dict[str, Optional[torch.Tensor]]  # {"weight": uint8 rows, "scale_shift": uint8 [n, 4] or None}
TableSource = Union[Rows, Callable[[int, int], torch.Tensor]]  # quantized rows, or float rows to quantize


def _check_rows(name: str, rows: Rows, want: Tuple[int, int], precision: str) -> None:
    weight, scale_shift = rows.get("weight"), rows.get("scale_shift")
    if weight is None or tuple(weight.shape) != want or weight.dtype != torch.uint8:
        raise ValueError(f"table {name}: {precision} rows must be uint8 {list(want)}, got "
                         f"{None if weight is None else (weight.dtype, list(weight.shape))}")
    if (scale_shift is None) != (BITS[precision] >= 16):
        raise ValueError(f"table {name}: {precision} rows {'need' if BITS[precision] < 16 else 'take no'} "
                         "per-row scale and shift")
    if scale_shift is not None and (tuple(scale_shift.shape) != (want[0], 4) or scale_shift.dtype != torch.uint8):
        raise ValueError(f"table {name}: scale and shift must be uint8 [{want[0]}, 4], got "
                         f"{(scale_shift.dtype, list(scale_shift.shape))}")


def quantized_ebc(configs: List[Dict[str, Any]], is_weighted: bool, tables: Mapping[str, TableSource],
                  precision: str, device: torch.device) -> QuantEmbeddingBagCollection:
    """TorchRec's quantized EBC over ``configs`` (fbgemm's inference TBE lookups) holding ``tables``: per table
    its quantized rows, or a function giving float rows ``(start, stop) -> [stop - start, dim]`` that are
    quantized chunk by chunk. Rows are written straight into the TBE's own storage, so the peak memory is one
    copy of the tables beyond the given ones."""
    built = [config_from_dict(c, precision) for c in configs]
    check_dims(built, precision)
    missing = [c.name for c in built if c.name not in tables]
    if missing:
        raise ValueError(f"no quantized rows for tables {missing}")
    for c in built:
        source = tables[c.name]
        if not callable(source):
            _check_rows(c.name, source, (c.num_embeddings, c.embedding_dim * BITS[precision] // 8), precision)
    qebc = QuantEmbeddingBagCollection(tables=built, is_weighted=is_weighted, device=device, output_dtype=torch.float)
    for tbe in qebc._emb_modules:  # the TBEs, one per pooling type; their tables in spec order
        for spec, (weight, scale_shift) in zip(tbe.embedding_specs, tbe.split_embedding_weights()):
            source = tables[spec[0]]
            if callable(source):
                quantize_into(weight, scale_shift, precision, source)
            else:
                weight.copy_(source["weight"])
                if scale_shift is not None:
                    scale_shift.copy_(source["scale_shift"])
    return qebc


# ---- the full tables' id maths ---------------------------------------------------------------------------------
class ReducedIdsEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """``full`` at inference: raw int64 ids reduced ``id mod rows`` per feature (as the training data path does,
    ``trainer.train.ids``), then TorchRec's quantized EBC. Raw ids in, like every other method's inference module."""

    def __init__(self, ebc: QuantEmbeddingBagCollection, rows: torch.Tensor) -> None:
        super().__init__()
        self.ebc = ebc
        self.feature_names: List[str] = [f for c in ebc.embedding_bag_configs() for f in c.feature_names]
        self.register_buffer("rows", rows.to(torch.int64), persistent=False)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        from embeddings.checks import select_features

        features = select_features(features, self.feature_names, "full")
        values = features.values().to(torch.int64)
        per_feature = features.lengths().view(len(self.feature_names), -1).sum(1)
        modulus = torch.repeat_interleave(self.rows, per_feature, output_size=values.numel())
        kjt = KeyedJaggedTensor(keys=self.feature_names, values=torch.remainder(values, modulus),
                                lengths=features.lengths(), stride=features.stride())
        return self.ebc(kjt)

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self.ebc.embedding_bag_configs()

    def is_weighted(self) -> bool:
        return False


# ---- taking a float module apart and putting the inference module together ------------------------------------
@dataclass
class SparseParts:
    """An inference sparse module as plain data: ``form`` (one of :func:`known_forms`), the inner tables' configs,
    whether their lookups are weighted, their quantized rows, the layout object (``None`` for ``full``; in process
    only, never written to an artifact), the module's own buffers (non-persistent ones included: salts,
    dictionaries, hot-id keys), its other parameters (MEM-REC's weight table) and ``state``, the tensors the
    method's module is rebuilt from beyond the config (``embeddings.types.InferenceHooks``; filled by the
    exporter), all on the CPU."""

    form: str
    precision: str
    configs: List[Dict[str, Any]]
    is_weighted: bool
    tables: Dict[str, TableSource]
    layout: Any = None
    buffers: Dict[str, torch.Tensor] = field(default_factory=dict)
    parameters: Dict[str, torch.Tensor] = field(default_factory=dict)
    state: Dict[str, torch.Tensor] = field(default_factory=dict)

    def table_bytes(self) -> int:
        return sum(table_bytes(t) for t in self.tables.values() if not callable(t))


@dataclass(frozen=True)
class InferenceForm:
    """How a method's module becomes its inference module: the module types it covers, the attribute of its inner
    EmbeddingBagCollection (swapped for the quantized one) and ``shell(layout)``, the module rebuilt on ``meta``
    around a layout. Registered by the module's own file (:func:`register_form`), so a new method adds its form
    without editing this one."""

    module_type: type
    inner: str
    shell: Callable[[Any], nn.Module]


_FORMS: Dict[str, InferenceForm] = {}


def register_form(name: str, form: InferenceForm) -> None:
    if name == "full" or (name in _FORMS and _FORMS[name] != form):
        raise ValueError(f"inference form {name!r} is already registered")
    _FORMS[name] = form


def known_forms() -> List[str]:
    """``full`` (a plain EmbeddingBagCollection) and every registered form."""
    return ["full", *_FORMS]


def inner_ebc(module: nn.Module) -> EmbeddingBagCollection:
    """The EmbeddingBagCollection whose tables a sparse module of any known form looks up."""
    form = _form(module)
    return module if form == "full" else getattr(module, _FORMS[form].inner)


def form_of(module: nn.Module) -> str:
    """The inference form of a sparse module: ``full`` or a registered one (a TypeError for none)."""
    return _form(module)


def _form(module: nn.Module) -> str:
    exact = [name for name, f in _FORMS.items() if type(module) is f.module_type]
    covering = exact or [name for name, f in reversed(list(_FORMS.items())) if isinstance(module, f.module_type)]
    if covering:
        return covering[0]
    if isinstance(module, EmbeddingBagCollection):
        return "full"
    raise TypeError(f"no inference form for a {type(module).__name__} sparse module (register one with "
                    "embeddings.quant.register_form)")


def fused_hashing(layout: Any) -> Any:
    """The layout with its hashing on the registered operator (``hash_backend: fused``, the same bits)."""
    return _fused_hashing(layout)


def _fused_hashing(layout: Any) -> Any:
    """The layout with its hashing on the registered operator (``hash_backend: fused``, the same bits)."""
    options = getattr(layout, "options", None)
    if options is None or getattr(options, "hash_backend", "fused") == "fused":
        return layout
    layout = copy.copy(layout)  # the trained module keeps its own
    layout.options = replace(options, hash_backend="fused")
    return layout


def split_sparse(module: nn.Module, precision: str) -> SparseParts:
    """Quantize ``module``'s inner tables to ``precision``; keep its layout, buffers and other parameters."""
    check_precision(precision)
    form = _form(module)
    inner: EmbeddingBagCollection = module if form == "full" else getattr(module, _FORMS[form].inner)
    configs = [config_dict(c) for c in inner.embedding_bag_configs()]
    check_dims([config_from_dict(c, precision) for c in configs], precision)
    tables: Dict[str, TableSource] = {}
    for c in configs:
        weight: torch.Tensor = inner.embedding_bags[c["name"]].weight.detach()

        def rows_of(start: int, stop: int, w: torch.Tensor = weight) -> torch.Tensor:
            return w[start:stop].cpu()
        tables[c["name"]] = quantize_table(weight.shape[0], weight.shape[1], precision, rows_of)
    if form == "full":
        rows = torch.tensor([c["num_embeddings"] for c in configs for _ in c["feature_names"]])
        return SparseParts(form, precision, configs, False, tables, buffers={"rows": rows})
    inner_prefix = _FORMS[form].inner + "."
    buffers = {n: b.detach().cpu() for n, b in module.named_buffers() if not n.startswith(inner_prefix)}
    parameters = {n: p.detach().cpu() for n, p in module.named_parameters() if not n.startswith(inner_prefix)}
    return SparseParts(form, precision, configs, bool(inner.is_weighted()), tables, _fused_hashing(module.layout),
                       buffers, parameters)


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor, kind: str) -> None:
    """Replace ``module``'s buffer or parameter ``name`` by a copy of ``value`` (same dtype and shape)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    current = getattr(owner, leaf, None)
    if not isinstance(current, torch.Tensor) or current.dtype != value.dtype or current.shape != value.shape:
        raise ValueError(f"{kind} {name!r}: this code's module has "
                         f"{None if current is None else (current.dtype, list(current.shape))}, the artifact "
                         f"{(value.dtype, list(value.shape))}")
    value = value.clone()  # own memory: the given tensor may be a view of a memory-mapped artifact
    if kind == "parameter":
        setattr(owner, leaf, nn.Parameter(value, requires_grad=False))
    else:
        setattr(owner, leaf, value)


def build_sparse(parts: SparseParts, device: torch.device) -> nn.Module:
    """The inference sparse module of ``parts`` on ``device``: the method's module around a quantized EBC."""
    if parts.form not in known_forms():
        raise ValueError(f"unknown sparse module form {parts.form!r} (known: {', '.join(known_forms())}); the "
                         "method that writes it registers it with embeddings.quant.register_form")
    check_precision(parts.precision)
    qebc = quantized_ebc(parts.configs, parts.is_weighted, parts.tables, parts.precision, device)
    if parts.form == "full":
        return ReducedIdsEmbeddingBagCollection(qebc, parts.buffers["rows"].to(device).clone())
    # the method's own module, built on meta (no float table), with the quantized EBC in place of its inner one
    form = _FORMS[parts.form]
    shell = form.shell(parts.layout)
    setattr(shell, form.inner, qebc)
    expected = {n for n, _ in shell.named_buffers() if not n.startswith(form.inner + ".")}
    expected_params = {n for n, _ in shell.named_parameters() if not n.startswith(form.inner + ".")}
    if expected != set(parts.buffers) or expected_params != set(parts.parameters):
        raise ValueError(f"the {parts.form} module of this code has buffers {sorted(expected)} and parameters "
                         f"{sorted(expected_params)}; the artifact has {sorted(parts.buffers)} and "
                         f"{sorted(parts.parameters)}")
    for name, value in parts.buffers.items():
        _set_tensor(shell, name, value.to(device), "buffer")
    for name, value in parts.parameters.items():
        _set_tensor(shell, name, value.to(device), "parameter")
    return shell.eval()


def to_inference(module: nn.Module, precision: str, device: Optional[torch.device] = None) -> nn.Module:
    """A trained sparse module as its inference module at ``precision`` (in process; no artifact)."""
    return build_sparse(split_sparse(module, precision), device or torch.device("cpu"))


__all__ = ["BITS", "InferenceForm", "PRECISIONS", "ReducedIdsEmbeddingBagCollection", "SparseParts", "build_sparse", "check_precision",
           "config_dict", "form_of", "fused_hashing", "inner_ebc", "known_forms", "quantize_rows", "quantize_table", "quantized_ebc", "register_form", "split_sparse", "to_inference"]
