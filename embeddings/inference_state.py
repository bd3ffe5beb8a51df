"""What an inference artifact stores of a method's module beyond the config, and how the module is rebuilt from it.

An artifact (``trainer.serve.export``) holds data only: tensors, plain containers, strings and numbers. The
method's module is rebuilt at load by the installed package - ``spec.build`` on ``meta`` from the stored config
and table sizes - and its tables, buffers and parameters are then loaded into it as tensors. What the build
would otherwise read from data files is stored as tensors by the spec's :class:`~embeddings.types.InferenceHooks`:

- the hot set (``embeddings.hot_rows``; from ``compactrec prepare``'s id counts at training): ``hot_sizes``
  (int64 [F], hot values per feature) and ``hot_values`` (int64, each feature's values ascending, features in
  order). Given back as ``SparseArchContext.hot``, every method takes it instead of selecting one from the id
  counts (``embeddings.budget.select_hot``, ``full``'s vocabulary), so the budget sizes the same tables.
- LMA's dictionary size (``lma_dictionary_entries``): its keys and rows are the module's buffers, loaded after.

:func:`default_hooks` is the hooks of a method whose module is ``build(ctx, options)`` with a hot set at most
(every built-in method but LMA, and any method made with ``embeddings.remap.remapped_spec``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Sequence

import numpy as np
import torch
from torch import nn

from embeddings.hot_rows import HotSet
from embeddings.types import InferenceHooks, SparseArchContext, SparseArchSpec

HOT_SIZES, HOT_VALUES = "hot_sizes", "hot_values"


def hot_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The hot set of ``module``'s layout as two tensors (an empty set for a module without one)."""
    layout = getattr(module, "layout", None)
    lookup = getattr(layout, "hot", None)
    hot = getattr(lookup, "hot", None)
    if not isinstance(hot, HotSet):
        names = list(getattr(layout, "feature_names", []))
        hot = HotSet.empty(names)
    values = [np.asarray(v, dtype=np.int64) for v in hot.values]
    return {HOT_SIZES: torch.tensor([v.size for v in values], dtype=torch.int64),
            HOT_VALUES: torch.from_numpy(np.concatenate(values) if values else np.empty(0, np.int64)).clone()}


def hot_from_state(state: Dict[str, torch.Tensor], feature_names: Sequence[str]) -> HotSet:
    """The :class:`HotSet` that :func:`hot_state` stored; a ValueError if the tensors do not fit the features."""
    sizes, values = state.get(HOT_SIZES), state.get(HOT_VALUES)
    if not isinstance(sizes, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise ValueError(f"the stored module state lacks {HOT_SIZES!r} / {HOT_VALUES!r} (its hot set)")
    if (sizes.dtype != torch.int64 or values.dtype != torch.int64 or tuple(sizes.shape) != (len(feature_names),)
            or values.dim() != 1 or int(sizes.sum()) != values.numel() or bool((sizes < 0).any())):
        raise ValueError(f"the stored hot set (sizes {sizes.dtype} {list(sizes.shape)}, values {values.dtype} "
                         f"{list(values.shape)}) does not fit {len(feature_names)} features")
    parts = torch.split(values, [int(n) for n in sizes])
    arrays = tuple(p.numpy().astype(np.int64, copy=True) for p in parts)
    if any(a.size > 1 and not bool(np.all(a[1:] > a[:-1])) for a in arrays):
        raise ValueError("the stored hot values are not ascending per feature")
    return HotSet(tuple(feature_names), arrays)


def with_stored_hot(ctx: SparseArchContext, state: Dict[str, torch.Tensor]) -> SparseArchContext:
    """``ctx`` whose hot set is the stored one (no id counts)."""
    return dataclasses.replace(ctx, hot=hot_from_state(state, ctx.feature_names), id_counts=None)


def default_hooks(build: Callable[[SparseArchContext, Any], nn.Module]) -> InferenceHooks:
    """Store the hot set; rebuild with ``build(ctx, options)`` given that hot set."""
    return InferenceHooks(state=hot_state,
                          rebuild=lambda ctx, options, state: build(with_stored_hot(ctx, state), options))


def hooks_of(spec: SparseArchSpec) -> InferenceHooks:
    """``spec.inference``, or a ValueError saying what a method needs to be exported."""
    if spec.inference is None:
        raise ValueError(f"embeddings.kind {spec.name!r} has no inference hooks, so it cannot be exported as a "
                         "data-only artifact: give its SparseArchSpec inference=InferenceHooks(state=..., "
                         "rebuild=...) (embeddings/types.py; embeddings.inference_state.default_hooks(build) for a "
                         "module built from the config and at most a hot set)")
    return spec.inference


__all__ = ["HOT_SIZES", "HOT_VALUES", "default_hooks", "hooks_of", "hot_from_state", "hot_state", "with_stored_hot"]
