"""One byte budget per method, hot rows included.

Every compressed method takes ``budget``: the bytes it may keep (every parameter and every buffer: tables,
hot rows, their lookup keys, dictionaries, salts) as a fraction of the full tables' bytes
(``sum(num_embeddings_per_feature) * embedding_dim * 4``). ``hot_share`` of that budget buys hot rows (exact
rows for the most frequent ids, ``embeddings.hot_rows``; each costs its row plus its lookup key), the method
sizes its own tables from what remains. Optimizer state is reported separately and is not in the budget.

``precision`` (:class:`PrecisionOptions`, the hashing trick and the chunk-table methods) is the tables' storage type:
the budget buys rows at its real bytes per element (fp16: twice the rows of fp32 for the same bytes); the full
tables the budget is a fraction of stay fp32. Optimizer state stays fp32 whatever the tables' precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

from torchrec.modules.embedding_configs import DataType

from embeddings.checks import check_choice, check_int, where
from embeddings.hot_rows import HotSet
from embeddings.types import SparseArchContext

FLOAT_BYTES = 4
PRECISIONS = ("fp32", "fp16")
PRECISION_BYTES = {"fp32": 4, "fp16": 2}
PRECISION_DATA_TYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}


@dataclass
class PrecisionOptions:
    """The tables' storage precision (mixed into the options of the methods whose kernels train it).

    - ``precision``: "fp32" or "fp16": the element type of every table (hot rows included: they are rows of the
      same tables). fp16 tables train with fp32 arithmetic and stochastic rounding of each updated row on the fused
      operator (``embeddings.ops.rounding``) and with fbgemm's FP16 TBE (``weights_precision``) when sharded; the
      budget buys rows at 2 bytes an element. bf16 is not offered: TorchRec's unsharded EmbeddingBagCollection
      stores every non-fp32 ``data_type`` as fp16.
    """

    precision: str = "fp32"

    def check_precision(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)

    @property
    def element_bytes(self) -> int:
        """Bytes of one table element at ``precision``."""
        return PRECISION_BYTES[self.precision]

    @property
    def data_type(self) -> DataType:
        """The inner tables' ``EmbeddingBagConfig.data_type``."""
        return PRECISION_DATA_TYPES[self.precision]


@dataclass
class BudgetOptions:
    """Options every compressed method shares (mixed into its options dataclass).

    - ``budget``: bytes kept (parameters and buffers, everything) / bytes of the full fp32 tables; null =
      the method's own size options. Needs the full tables' sizes (``embeddings.num_embeddings_per_feature``,
      the dataset manifest, or ``embeddings.table_sizes: counts``).
    - ``hot_share``: fraction of ``budget`` spent on hot rows: the most frequent ids of the training data (by
      ``compactrec prepare``'s id counts) get exact rows of their own, the rest go through the method.
      0 = no hot rows. Needs ``budget``.
    - ``hot_min_count``: an id needs at least this many training occurrences to get a hot row.
    """

    budget: Optional[float] = None
    hot_share: float = 0.0
    hot_min_count: int = 2

    def check_budget(self) -> None:
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
                raise TypeError(f"{where('budget')} must be a number, got {self.budget!r}")
            if not 0.0 < float(self.budget) <= 1e6:
                raise ValueError(f"{where('budget')} must be in (0, 1e6], got {self.budget}")
        if isinstance(self.hot_share, bool) or not isinstance(self.hot_share, (int, float)):
            raise TypeError(f"{where('hot_share')} must be a number, got {self.hot_share!r}")
        if not 0.0 <= float(self.hot_share) < 1.0:
            raise ValueError(f"{where('hot_share')} must be in [0, 1), got {self.hot_share}")
        if self.hot_share > 0 and self.budget is None:
            raise ValueError(f"{where('hot_share')}={self.hot_share} needs {where('budget')} (hot rows are a share of "
                             "the byte budget)")
        check_int("hot_min_count", self.hot_min_count, 1)

    @property
    def needs_table_sizes(self) -> bool:
        """Whether building the module needs the full tables' sizes (a budget is a fraction of them)."""
        return self.budget is not None

    @property
    def needs_id_counts(self) -> bool:
        """Whether building the module needs the training data's id counts (``compactrec prepare``)."""
        return self.hot_share > 0


def budget_bytes(ctx: SparseArchContext, budget: float) -> int:
    """The budget in bytes: ``budget`` x the full tables' bytes, rounded down."""
    full = sum(ctx.table_sizes(where("budget"))) * ctx.embedding_dim * FLOAT_BYTES
    return int(math.floor(float(budget) * full))


def select_hot(ctx: SparseArchContext, options: BudgetOptions, row_bytes: int) -> HotSet:
    """The hot set bought by ``hot_share`` of the budget when each hot row costs ``row_bytes`` plus its key
    (``ctx.hot`` when the context gives one: a module rebuilt from an inference artifact)."""
    if options.hot_share <= 0 or options.budget is None:
        return HotSet.empty(ctx.feature_names)
    if ctx.hot is not None:  # rebuilt from an inference artifact: the hot set it stored
        if list(ctx.hot.feature_names) != list(ctx.feature_names):
            raise ValueError(f"the given hot set's features {list(ctx.hot.feature_names)} differ from "
                             f"{list(ctx.feature_names)}")
        return ctx.hot
    if ctx.id_counts is None:
        raise ValueError(f"{where('hot_share')}={options.hot_share}: hot rows need the id counts of the training "
                         "data; run `compactrec prepare CONFIG` (it writes data.counts_path)")
    spend = options.hot_share * budget_bytes(ctx, options.budget)
    key_bytes = 8
    while True:
        # + 6: the fused kernels' open-addressing slots, 4 B each, 4/3 per key (embeddings.hot_rows.slot_capacity)
        hot = HotSet.select(ctx.id_counts, ctx.feature_names, int(spend // (row_bytes + key_bytes + 6)),
                            options.hot_min_count)
        if hot.key_bytes() <= key_bytes:
            return hot
        key_bytes = hot.key_bytes()  # values outside the packed range: 16-byte keys, fewer rows


def split_rows(total: int, weights: Sequence[float], what: str) -> List[int]:
    """``total`` rows split in proportion to ``weights`` (rounded down), at least 1 each; an error naming
    ``what`` if the budget cannot give every part one row."""
    count = len(weights)
    if total < count:
        raise ValueError(f"{where('budget')} leaves {total} rows for {what}, fewer than the {count} needed (one "
                         "each); raise the budget or lower hot_share")
    weight_sum = float(sum(weights))
    if weight_sum <= 0:
        return [total // count] * count
    spare = total - count  # one row each first, the rest in proportion
    return [1 + int(math.floor(spare * w / weight_sum)) for w in weights]


def remaining(total: int, used: int, what: str) -> int:
    """``total - used``; an error naming ``what`` when the fixed parts alone exceed the budget."""
    if used > total:
        raise ValueError(f"{where('budget')}: {what} alone take {used:,} B, more than the budget of {total:,} B; "
                         "raise the budget or lower hot_share")
    return total - used


__all__: Sequence[str] = ["BudgetOptions", "FLOAT_BYTES", "PRECISIONS", "PrecisionOptions", "budget_bytes", "remaining", "select_hot", "split_rows"]
