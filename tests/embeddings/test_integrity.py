"""The artifacts `compactrec prepare` writes (the LMA index, the id counts) carry a sha256 of each array in
their JSON header: a file damaged on disk is an error naming it and the rebuild command, never silently other
numbers; `prepare` rebuilds a damaged one."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import pytest

from embeddings.id_counts import FrequencyCounter, load_counts
from embeddings.lma_index import load_index, load_keys_and_counts, verify_index
from tests.embeddings.test_lma import write_synthetic_index


def _write_counts(path: Path) -> Path:
    counter = FrequencyCounter(2, capacity=1000, min_flush=10)
    rng = np.random.default_rng(0)
    for f in range(2):
        counter.add(f, rng.integers(0, 500, 4000))
    return counter.result(["a", "b"]).save(path)


def _flip_middle_of(path: Path, member: str, nbytes: int = 8) -> None:
    """Flip ``nbytes`` bytes in the middle of the array data of ``member`` (past its npy header)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    middle = start + 128 + (info.compress_size - 128) // 2  # npy headers are at most 128 bytes here
    assert middle + nbytes < start + info.compress_size
    for i in range(middle, middle + nbytes):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _rezip_with_changed(path: Path, member: str) -> None:
    """The same archive, header untouched, one array changed in its middle: a valid zip (CRCs right) that
    only the sha256 in the header tells apart."""
    with zipfile.ZipFile(path) as z:
        arrays: Dict[str, np.ndarray] = {n[:-4]: np.load(z.open(n)) for n in z.namelist()}
    a = arrays[member[:-4]].copy()
    flat = a.reshape(-1)
    flat[flat.size // 2] += 1
    arrays[member[:-4]] = a
    with open(path, "wb") as f:
        np.savez(f, **arrays)


LOADERS: Dict[str, Callable[[Path], object]] = {"index": load_index, "keys": load_keys_and_counts,
                                               "verify": verify_index}


@pytest.mark.parametrize("damage", [_flip_middle_of, _rezip_with_changed])
@pytest.mark.parametrize("member", ["keys.npy", "signatures.npy", "counts.npy"])
def test_damaged_lma_index_is_an_error_naming_the_file(tmp_path: Path, damage: Callable[[Path, str], None],
                                                       member: str) -> None:
    path = tmp_path / "lma_index.npz"
    index = write_synthetic_index(path, ids=400)
    assert set(index.header.sha256) == {"keys", "signatures", "features", "counts"}
    load_index(path)  # intact
    damage(path, member)
    loaders = dict(LOADERS)
    if member == "signatures.npy":
        loaders.pop("keys")  # reads keys and counts only
    for load in loaders.values():
        with pytest.raises(ValueError, match=r"lma_index\.npz: LMA index is damaged .*re-run `compactrec prepare "
                                             r"CONFIG`"):
            load(path)


@pytest.mark.parametrize("damage", [_flip_middle_of, _rezip_with_changed])
@pytest.mark.parametrize("member", ["values.npy", "counts.npy"])
def test_damaged_id_counts_are_an_error_naming_the_file(tmp_path: Path, damage: Callable[[Path, str], None],
                                                        member: str) -> None:
    path = _write_counts(tmp_path / "id_counts.npz")
    assert set(json.loads(str(np.load(path)["header"]))["sha256"]) == {"values", "counts", "offsets"}
    load_counts(path)
    damage(path, member)
    with pytest.raises(ValueError, match=r"id_counts\.npz: id counts is damaged .*re-run `compactrec prepare "
                                         r"CONFIG`"):
        load_counts(path)
