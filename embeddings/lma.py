"""``lma``: locality-sensitive-hashing memory allocation (Desai et al., arXiv 2103.06124), in chunks.

Memory: the chunk table of ``embeddings.robe`` (one ``[rows, Z]`` array shared by all features, or one per
feature group, looked up by fbgemm TBE and sharded row-wise). Addresses: chunk ``c`` of value ``(f, x)``
lives at the row derived from K minhashes of the value's semantic set - the sampled training rows it
occurs in - mixed with ``c`` and the seed (``embeddings.lma_minhash``), so values that co-occur share
memory with probability ~Jaccard**K and others collide only at random (~1/rows).

The minhash signatures come from an index artifact (``embeddings.lma_index``) built by
``compactrec lma-index CONFIG`` (``embeddings.lma_build``) and named by ``embeddings.options.index_path``. At
build the module checks the artifact against the config (format version, seed, K, chunks, features) and
derives each indexed value's C int32 rows for the configured memory size; it keeps them with the sorted
value keys as replicated buffers - ``V * (8 + 4 C)`` bytes, counted in the memory report - and looks ids up
with a binary search. **Fallback**: a value not in the index (never sampled, or below ``min_count``) gets
ROBE's random addresses ``hash_to_range(x, f, seed, c, rows)``, so any int64 id works.

With hot rows (``budget`` + ``hot_share``, ``embeddings.robe``), hot values take their exact rows and are left out
of the dictionary (their entries would never be read), which the budget then spends on the shared array.

An inference artifact stores the dictionary as the module's buffers and its size as state (:func:`inference_state`);
:func:`rebuild` builds the same layout on ``meta`` from the config, that size and the stored hot set
(:class:`StoredDictionaryAddresser`), with no index file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from embeddings.budget import budget_bytes
from embeddings.remap import (
    RemappedEmbeddingBagCollection,
    check_choice,
    check_int,
    remapped_spec,
    where,
    wrap_of,
)
from embeddings.id_hash import salted_hash
from embeddings.lma_build import HOOKS
from embeddings.lma_index import BUILD_COMMAND, IndexHeader, check_header, load_index, read_header
from embeddings.hot_rows import HotSet, hot_bytes
from embeddings.lma_minhash import SEMANTIC_SETS, KEY_SEED, chunk_addresses, key_salts, value_keys
from embeddings.chunk_table import ChunkAddresser, ChunkedOptions, ChunkLayout, RandomChunkAddresser
from embeddings.inference_state import hot_state, with_stored_hot
from embeddings.types import InferenceHooks, SparseArchContext

MAX_ROWS = (1 << 31) - 1  # rows are kept as int32


@dataclass
class LmaOptions(ChunkedOptions):
    """LMA options: the chunk-table options (``memory_fraction``/``num_rows``, ``chunk_size``,
    ``feature_groups``, ``pooling``, ``seed``; see ``embeddings.chunk_table.ChunkedOptions``) plus:

    - ``num_hashes`` (K): minhashes per chunk; two values share a chunk with probability ~Jaccard**K.
    - ``index_path``: the artifact of ``compactrec lma-index`` (required to build the module).
    - ``sample_rows``: training rows the index samples (the paper's 125,000), capped by the data size.
    - ``min_count``: index only values occurring in at least this many sampled rows (the rest use the
      random fallback; a larger value shrinks the dictionary counted in the memory report).
    - ``semantic_set``: what two values must share to share memory. "rows" (the paper): the sampled rows they
      occur in, so only values of *different* features that co-occur ever share; "values" (this project's
      variant): the values of other features they occur with, so values of the *same* feature seen in the
      same contexts share, and values of different features never do (``embeddings.lma_minhash``).
    - ``context_min_values``: with "values", the context features are those with at least this many distinct
      values in the sampled rows (small features are in every value's context and would merge everything).
    - ``dictionary_share``: with ``budget``, the dictionary keeps at most this share of the budget left after
      the hot rows: the index's most frequent values first (the others use the random fallback). Null = the
      whole index (an error if it does not fit).
    """

    num_hashes: int = 2
    index_path: Optional[str] = None
    sample_rows: int = 125_000
    min_count: int = 1
    dictionary_share: Optional[float] = 0.5
    semantic_set: str = "rows"
    context_min_values: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_hashes", self.num_hashes, 1, 64)
        check_int("sample_rows", self.sample_rows, 1, MAX_ROWS)
        check_int("min_count", self.min_count, 1)
        check_choice("semantic_set", self.semantic_set, SEMANTIC_SETS)
        check_int("context_min_values", self.context_min_values, 1)
        if self.index_path is not None and (not isinstance(self.index_path, str) or not self.index_path):
            raise ValueError(f"{where('index_path')} must be a non-empty path or null, got {self.index_path!r}")
        if self.dictionary_share is not None and not (isinstance(self.dictionary_share, (int, float))
                                                      and not isinstance(self.dictionary_share, bool)
                                                      and 0.0 <= self.dictionary_share < 1.0):
            raise ValueError(f"{where('dictionary_share')} must be in [0, 1) or null, got {self.dictionary_share!r}")
        if self.num_rows is not None and self.num_rows > MAX_ROWS:
            raise ValueError(f"{where('num_rows')} must be <= {MAX_ROWS} (rows are kept as int32), got {self.num_rows}")


def hot_value_keys(hot: HotSet) -> np.ndarray:
    """The index keys of every hot value (``embeddings.lma_minhash.value_keys``)."""
    parts = [value_keys(torch.from_numpy(v), torch.full((v.size,), f, dtype=torch.int64)).numpy()
             for f, v in enumerate(hot.values) if v.size]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def kept_entries(path: str, hot: HotSet, limit: Optional[int] = None) -> np.ndarray:
    """Mask of the index entries the dictionary keeps: all but the hot values', and of those at most
    ``limit``, the most frequent in the sampled rows first (ties: smaller key)."""
    from embeddings.lma_index import load_keys_and_counts

    keys, counts = load_keys_and_counts(path)
    keep = ~np.isin(keys, hot_value_keys(hot)) if hot.total else np.ones(keys.size, dtype=bool)
    if limit is not None and int(keep.sum()) > limit:
        candidates = np.flatnonzero(keep)
        order = np.lexsort((keys[candidates], -counts[candidates].astype(np.int64)))
        keep = np.zeros(keys.size, dtype=bool)
        keep[candidates[order[:limit]]] = True
    return keep


class DictionaryChunkAddresser(ChunkAddresser):
    """Values in the dictionary (buffers ``lma_index_keys`` [V] int64, sorted, and ``lma_index_rows`` [V, C]
    int32): their rows; others: ROBE's random rows. Subclasses say where the dictionary comes from."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.fallback = RandomChunkAddresser(seed)

    @property
    def num_entries(self) -> int:
        raise NotImplementedError

    def index_rows(self, layout: ChunkLayout) -> Tuple[torch.Tensor, torch.Tensor]:
        """(sorted keys [V] int64, rows [V, C] int32) for ``layout``'s memory size, on CPU."""
        raise NotImplementedError

    def buffers(self, layout: ChunkLayout, device: torch.device) -> Dict[str, torch.Tensor]:
        out = self.fallback.buffers(layout, device)
        out["lma_key_salts"] = key_salts(len(layout.feature_names)).to(device)
        if device.type == "meta":  # planning, or a module rebuilt from an artifact: shapes only, nothing read
            count = self.num_entries
            out["lma_index_keys"] = torch.empty(count, dtype=torch.int64, device=device)
            out["lma_index_rows"] = torch.empty(count, layout.num_chunks, dtype=torch.int32, device=device)
        else:
            keys, rows = self.index_rows(layout)
            out["lma_index_keys"], out["lma_index_rows"] = keys.to(device), rows.to(device)
        return out

    def rows(self, layout: ChunkLayout, values: torch.Tensor, feature_of_value: torch.Tensor,
             buffers: Mapping[str, torch.Tensor]) -> torch.Tensor:
        random_rows = self.fallback.rows(layout, values, feature_of_value, buffers)
        index_keys = buffers["lma_index_keys"]
        count = index_keys.numel()
        if count == 0:
            return random_rows
        keys = salted_hash(values, feature_of_value, buffers["lma_key_salts"], backend=layout.options.hash_backend)
        position = torch.searchsorted(index_keys, keys).clamp_(max=count - 1)
        found = index_keys[position] == keys
        return torch.where(found[:, None], buffers["lma_index_rows"][position].to(torch.int64), random_rows)


class MinhashChunkAddresser(DictionaryChunkAddresser):
    """The dictionary from the index file: indexed values' rows from their minhash signatures. ``keep`` masks
    the index entries kept in the dictionary (all but hot values')."""

    def __init__(self, path: str, header: IndexHeader, num_hashes: int, seed: int, keep: np.ndarray) -> None:
        super().__init__(seed)
        self.path = path
        self.header = header
        self.num_hashes = num_hashes
        self.keep = keep
        self._rows: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def num_entries(self) -> int:
        return int(self.keep.sum())

    def index_rows(self, layout: ChunkLayout) -> Tuple[torch.Tensor, torch.Tensor]:
        """Computed once from the index file."""
        if self._rows is None:
            index = load_index(self.path)
            check_header(index.header, self.path, seed=self.seed, semantic_set=self.header.semantic_set,
                         num_chunks=layout.num_chunks,
                         num_hashes=self.num_hashes, feature_names=layout.feature_names, key_seed=KEY_SEED)
            keep = self.keep
            features = torch.from_numpy(index.features[keep].astype("int64"))
            rows = torch.tensor(layout.feature_rows(), dtype=torch.int64)[features]
            wrap = torch.tensor(wrap_of(layout.feature_rows()), dtype=torch.int64)[features]
            by_feature = features if index.header.semantic_set == "values" else None
            addresses = chunk_addresses(torch.from_numpy(index.signatures[keep]), self.num_hashes, self.seed, rows,
                                        wrap, by_feature)
            self._rows = (torch.from_numpy(index.keys[keep]), addresses.to(torch.int32))
        return self._rows


class StoredDictionaryAddresser(DictionaryChunkAddresser):
    """The dictionary of a module rebuilt from an inference artifact: ``num_entries`` entries whose keys and rows
    are the artifact's buffers, loaded into the module after it is built on ``meta``; no index file."""

    def __init__(self, seed: int, num_entries: int) -> None:
        super().__init__(seed)
        self._entries = int(num_entries)

    @property
    def num_entries(self) -> int:
        return self._entries

    def index_rows(self, layout: ChunkLayout) -> Tuple[torch.Tensor, torch.Tensor]:
        raise ValueError("an LMA module rebuilt from an inference artifact is built on meta; its dictionary is the "
                         "artifact's lma_index_keys / lma_index_rows")


class LmaEmbeddingBagCollection(RemappedEmbeddingBagCollection):
    """LMA with chunks; drop-in for an EmbeddingBagCollection (KJT of raw int64 ids in)."""

    layout: ChunkLayout

    def __init__(self, ctx: SparseArchContext, options: LmaOptions, table_prefix: str = "lma",
                 dictionary_entries: Optional[int] = None) -> None:
        if dictionary_entries is not None:  # rebuilt from an inference artifact (:func:`rebuild`): no index file
            self._rebuild(ctx, options, table_prefix, dictionary_entries)
            return
        if options.index_path is None:
            raise ValueError(f"{where('index_path')} is not set: LMA needs the minhash index of the training data; "
                             f"build it with `{BUILD_COMMAND}` and set {where('index_path')} to its path")
        header = read_header(options.index_path)
        keep: Dict[str, np.ndarray] = {}

        def dictionary_bytes(hot: HotSet) -> int:  # the budget counts the dictionary before sizing the array
            entry = 8 + 4 * header.num_chunks
            limit = None
            if options.budget is not None and options.dictionary_share is not None:
                left = budget_bytes(ctx, options.budget) - hot_bytes(hot) - hot.total * ctx.embedding_dim * 4
                limit = max(0, int(options.dictionary_share * left)) // entry
            keep["mask"] = kept_entries(options.index_path, hot, limit)  # type: ignore[arg-type]
            return 8 * len(ctx.feature_names) + int(keep["mask"].sum()) * entry

        layout = ChunkLayout(ctx, options, table_prefix, method="lma", extra_bytes=dictionary_bytes)
        if "mask" not in keep:  # sized without a budget: the whole index
            keep["mask"] = np.ones(header.values_covered, dtype=bool)
        too_big = [r for r in layout.rows_per_group if r > MAX_ROWS]
        if too_big:
            raise ValueError(f"LMA tables of {too_big} rows exceed {MAX_ROWS} (rows are kept as int32); lower "
                             f"{where('memory_fraction')} or raise {where('chunk_size')}")
        check_header(header, options.index_path, seed=options.seed, semantic_set=options.semantic_set,
                     num_chunks=layout.num_chunks,
                     num_hashes=options.num_hashes, feature_names=layout.feature_names, key_seed=KEY_SEED)
        layout.addresser = MinhashChunkAddresser(options.index_path, header, options.num_hashes, options.seed,
                                                 keep["mask"])
        super().__init__(layout, ctx.device, ctx.all_pooling_factors())

    def _rebuild(self, ctx: SparseArchContext, options: LmaOptions, table_prefix: str, entries: int) -> None:
        """The layout training built, from the config and the dictionary's size: the budget counts the same
        ``entries`` dictionary entries (``8 + 4 C`` bytes each) before sizing the array."""
        num_chunks = ctx.embedding_dim // (options.chunk_size or ctx.embedding_dim)
        layout = ChunkLayout(ctx, options, table_prefix, method="lma",
                             extra_bytes=lambda hot: 8 * len(ctx.feature_names) + entries * (8 + 4 * num_chunks))
        layout.addresser = StoredDictionaryAddresser(options.seed, entries)
        super().__init__(layout, ctx.device, ctx.all_pooling_factors())


DICTIONARY_ENTRIES = "lma_dictionary_entries"


def inference_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The hot set and the dictionary's size (its keys and rows are the module's buffers)."""
    addresser = getattr(getattr(module, "layout", None), "addresser", None)
    if not isinstance(addresser, DictionaryChunkAddresser):
        raise TypeError(f"expected an LMA module, got {type(module).__name__}")
    return {**hot_state(module), DICTIONARY_ENTRIES: torch.tensor([addresser.num_entries], dtype=torch.int64)}


def rebuild(ctx: SparseArchContext, options: LmaOptions, state: Dict[str, torch.Tensor]) -> nn.Module:
    """The LMA module of :func:`inference_state` on ``ctx.device`` (``meta``), without the index file."""
    entries = state.get(DICTIONARY_ENTRIES)
    if not isinstance(entries, torch.Tensor) or entries.dtype != torch.int64 or entries.numel() != 1:
        raise ValueError(f"the stored LMA state lacks {DICTIONARY_ENTRIES!r} (one int64)")
    return LmaEmbeddingBagCollection(with_stored_hot(ctx, state), options, dictionary_entries=int(entries))


SPEC = dataclasses.replace(remapped_spec(
    "lma", LmaOptions, LmaEmbeddingBagCollection,
    "LMA: minhash (co-occurrence) chunk allocation in one shared array (Desai et al.)",
), artifact=HOOKS, inference=InferenceHooks(state=inference_state, rebuild=rebuild))
