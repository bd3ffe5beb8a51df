"""Options of the ``memrec`` method (MEM-REC, Jha et al. 2023), validated strictly at construction.

Defaults are the released CriteoTB setting (D = dw = 75000, K = kw = 1, two tables shared by all features).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from embeddings.budget import BudgetOptions
from embeddings.checks import check_choice, check_int, where
from embeddings.hashing import HASH_BACKENDS

# A weight-row index travels through TorchRec's input all-to-all as a float32 KJT weight; float32
# represents every integer exactly only up to 2**24.
MAX_WEIGHT_ROWS = 1 << 24

GRANULARITIES = ("per_token", "per_sample")
POOLINGS = ("sum", "mean")
WEIGHT_INITS = ("uniform", "ones")
TOKEN_INITS = ("uniform", "normal")
HASHES = ("mix", "identity")
DEFAULT_ROWS = 75_000  # the released CriteoTB setting's D = dw


@dataclass
class MemRecOptions(BudgetOptions):
    """MEM-REC hyper-parameters.

    - ``num_token_rows`` (D): rows of each token table (of the one shared table if ``shared_tables``);
      null = 75,000 (the released CriteoTB setting), or derived from ``budget``.
    - ``num_weight_rows`` (dw): rows of each dw x 1 weight table; null = D. At most 2**24 with every hot
      row's weight (the row index travels as a float32 KJT weight through the input all-to-all).
    - ``num_token_hashes`` (K) / ``num_weight_hashes`` (kw): hashes per id into the token / weight table.
      Each id becomes K * kw weighted token lookups: z = sum_k sum_j w[g_j] * M[h_k].
    - ``shared_tables``: one token table and one weight table for all features (the paper's "two
      tables"), else one of each per feature. The feature index is hashed in either way.
    - ``pooling``: "sum" or "mean" over the ids of a multi-hot bag; "mean" divides by the number of
      original ids in the bag (not the K * kw expanded lookups); an empty bag gives zeros.
    - ``seed``: hash seed, in [0, 2**63).
    - ``weight_init``: "uniform" = U(+-sqrt(1/dw)), the released code's DLRM rule U(+-sqrt(1/rows))
      (it has D = dw), which starts every z near zero; "ones" = every weight 1, so alpha = kw at start
      and z starts as the plain sum of the K token rows.
    - ``token_init``: "uniform" = U(+-sqrt(1/D)) (DLRM / TorchRec default); "normal" = N(0, sqrt(1/D)).
    - ``granularity``: "per_token" (one vector per sample and feature, drop-in for an
      EmbeddingBagCollection) or "per_sample" (the released code: all features of a sample in one bag,
      one m-dim vector per sample; needs ``shared_tables``).
    - ``hash``: "mix" (splitmix64-based, see ``embeddings.hashing``) or "identity": token row =
      id mod D and weight row 0 (needs K = kw = 1): with D >= id range and a weight of 1 the module
      is exactly an EmbeddingBagCollection, the degenerate setting that parity tests pin.
    - ``hash_backend``: "torch" (int64 tensor ops, any device) or "fused" (one-pass C kernel compiled at
      first use, CPU tensors only; same bits; falls back to "torch", logged, where it cannot run).
    - ``budget``, ``hot_share``, ``hot_min_count``: see ``embeddings.budget.BudgetOptions``. With ``budget``, D
      and dw (= D) are derived from it; a hot id is one lookup of its own token row scaled by its own weight
      (per-token granularity only).
    """

    num_token_rows: Optional[int] = None
    num_weight_rows: Optional[int] = None
    num_token_hashes: int = 1
    num_weight_hashes: int = 1
    shared_tables: bool = True
    pooling: str = "sum"
    seed: int = 0
    weight_init: str = "uniform"
    token_init: str = "uniform"
    granularity: str = "per_token"
    hash: str = "mix"
    hash_backend: str = "torch"

    def __post_init__(self) -> None:
        self.check_budget()
        if self.budget is not None and (self.num_token_rows is not None or self.num_weight_rows is not None):
            raise ValueError(f"set {where('budget')} or num_token_rows/num_weight_rows, not both")
        if self.budget is None:  # resolve the defaults (with a budget, the module's builder sizes both)
            if self.num_token_rows is None:
                self.num_token_rows = DEFAULT_ROWS
            if self.num_weight_rows is None:
                self.num_weight_rows = self.num_token_rows
            check_int("num_token_rows", self.num_token_rows, 1)
            check_int("num_weight_rows", self.num_weight_rows, 1, MAX_WEIGHT_ROWS)
        check_int("num_token_hashes", self.num_token_hashes, 1)
        check_int("num_weight_hashes", self.num_weight_hashes, 1)
        check_int("seed", self.seed, 0, (1 << 63) - 1)
        if not isinstance(self.shared_tables, bool):
            raise TypeError(f"{where('shared_tables')} must be a bool, got {self.shared_tables!r}")
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("weight_init", self.weight_init, WEIGHT_INITS)
        check_choice("token_init", self.token_init, TOKEN_INITS)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("hash", self.hash, HASHES)
        check_choice("hash_backend", self.hash_backend, HASH_BACKENDS)
        if self.granularity == "per_sample" and not self.shared_tables:
            raise ValueError(
                f"{where('shared_tables')} must be true with granularity 'per_sample' "
                "(all features of a sample share one bag, hence one token table), got false"
            )
        if self.hot_share > 0 and self.granularity == "per_sample":
            raise ValueError(f"{where('hot_share')} needs granularity 'per_token': per sample, every id of a sample "
                             "sums into one bag scaled by one alpha, so no id can keep an exact row")
        if self.hash == "identity" and self.hot_share > 0:
            raise ValueError(f"{where('hash')} 'identity' is the plain table: it takes no hot rows")
        if self.hash == "identity" and (self.num_token_hashes != 1 or self.num_weight_hashes != 1):
            raise ValueError(
                f"{where('hash')} 'identity' needs num_token_hashes = num_weight_hashes = 1, got "
                f"{self.num_token_hashes} and {self.num_weight_hashes}"
            )

    @property
    def token_rows(self) -> int:
        """D, once resolved (the builder sizes it from ``budget``)."""
        if self.num_token_rows is None:
            raise ValueError(f"{where('num_token_rows')} is not resolved: build the module through the memrec "
                             "builder (embeddings.memrec.build), which sizes it from the budget")
        return self.num_token_rows

    @property
    def weight_rows(self) -> int:
        """dw, once resolved."""
        if self.num_weight_rows is None:
            raise ValueError(f"{where('num_weight_rows')} is not resolved (see token_rows)")
        return self.num_weight_rows

    @property
    def lookups_per_id(self) -> int:
        """Weighted token lookups each raw id expands into (per-token granularity): K * kw."""
        return self.num_token_hashes * self.num_weight_hashes
