"""The one list of method variants every benchmark draws from (embedding stage, inference, quality protocol).

A variant is a registered ``embeddings.kind`` with two sets of options:

- ``sized(dim)``: the benchmarks' fixed sizes at embedding width ``dim`` (the speed benchmarks: MEM-REC's released
  CriteoTB setting, 1/16 of the full tables for the others); None where a variant is a quality-protocol one only.
- ``protocol``: the quality protocol's settings, applied on top of the grid cell's byte budget and hot share
  (``benchmarks/quality.py``); None where a variant is measured for speed only.

Adding a method to every benchmark is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

# MEM-REC's released CriteoTB setting: D = dw = 75000, K = kw = 1, weights start at ones
_MEMREC = {"num_token_rows": 75000, "num_weight_rows": 75000, "num_token_hashes": 1, "num_weight_hashes": 1,
           "weight_init": "ones"}


@dataclass(frozen=True)
class Variant:
    kind: str
    sized: Optional[Callable[[int], Dict[str, Any]]]
    protocol: Optional[Dict[str, Any]]
    note: str = ""


VARIANTS: Dict[str, Variant] = {
    "full": Variant("full", lambda dim: {}, {"ids": "vocabulary"}, "the true full model (a row per training value)"),
    "full_mod": Variant("full", None, {"ids": "mod"}, "MLPerf-v1 capping: id mod rows"),
    "memrec": Variant("memrec", lambda dim: dict(_MEMREC), {"weight_init": "ones"}, "per token (drop-in)"),
    "memrec_k2": Variant("memrec", lambda dim: {**_MEMREC, "num_token_hashes": 2}, None, "K = 2 token hashes"),
    "memrec_sample": Variant("memrec", lambda dim: {**_MEMREC, "granularity": "per_sample"}, None,
                             "per sample (the released code: one bag of a sample's ids)"),
    "lma": Variant("lma", lambda dim: {"memory_fraction": 1 / 16, "chunk_size": dim, "num_hashes": 2},
                   {"num_hashes": 2, "min_count": 2}, "minhash of the rows a value occurs in (the paper)"),
    "lma_values": Variant("lma", None, {"num_hashes": 2, "min_count": 2, "semantic_set": "values"},
                          "minhash of the co-occurring values"),
    "robe": Variant("robe", lambda dim: {"memory_fraction": 1 / 16, "chunk_size": dim}, {}, "one chunk per id"),
    "robe_c4": Variant("robe", lambda dim: {"memory_fraction": 1 / 16, "chunk_size": dim // 4}, None,
                       "4 chunks per id (Z = dim / 4): the quality protocol's best at 1/100 and 1/1000"),
    "hash": Variant("hash", lambda dim: {"memory_fraction": 1 / 16}, {}, "hashing trick"),
    "qr": Variant("qr", lambda dim: {"num_collisions": 4}, {}, "quotient-remainder"),
}


def variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def sized_options(name: str, dim: int) -> Dict[str, Any]:
    """(the benchmark sizes of ``name`` at width ``dim``)"""
    sized = variant(name).sized
    if sized is None:
        raise ValueError(f"method {name!r} is a quality-protocol variant only (no benchmark sizes)")
    return sized(dim)


def protocol_overrides(name: str) -> list[str]:
    """The quality protocol's config overrides of ``name``."""
    v = variant(name)
    if v.protocol is None:
        raise ValueError(f"method {name!r} is not a quality-protocol variant")
    return [f"embeddings.kind={v.kind}", *(f"embeddings.options.{k}={val}" for k, val in v.protocol.items())]


PROTOCOL_METHODS = tuple(n for n, v in VARIANTS.items() if v.protocol is not None)
