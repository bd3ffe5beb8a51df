"""The hot-row lookup searches its queries in sorted order (faster on CPU): the same positions as a plain
``torch.searchsorted`` for duplicates, misses below / above every key and single queries."""

from __future__ import annotations

import pytest
import torch

from embeddings.hot_rows import _sorted_search


@pytest.mark.parametrize("num_queries", [0, 1, 2, 1000])
def test_sorted_search_equals_searchsorted(num_queries: int) -> None:
    gen = torch.Generator().manual_seed(num_queries)
    keys = torch.sort(torch.randint(-100, 100, (50,), generator=gen))[0]  # duplicate keys too
    query = torch.randint(-150, 150, (num_queries,), generator=gen)  # below, between, equal, above
    assert torch.equal(_sorted_search(keys, query), torch.searchsorted(keys, query))
