"""Fuzzing the data readers with malformed input, deterministically (seeded): the npy / npz / multi-hot cases
(shared dataset and helpers: ``common.py``, fixtures: ``conftest.py``).

Valid small days (raw Criteo TSV, TorchRec npy, MLPerf multi-hot npz, a manifest) are mutated: truncated at
random byte offsets (mid-row, mid-header, mid-zip), given wrong column counts, non-hex / non-integer / too
large tokens, bad labels, empty fields, wrong dtypes, shapes and members, negative or huge ids, unknown names.
Every mutation must end in one of two ways:

- an error whose message names the file (and for text the line and the column, for arrays the row and the
  column / member);
- for TSV rows under ``data.bad_rows: skip``, a skip counted by reason, the good rows coming out exactly as
  from the unmutated file.

What parses is always compared with the original, so a silent wrong result fails the test. The bad-token
cases of ``test_tsv.py`` and the dtype cases of ``test_npy_npz.py`` are extended here, not repeated.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from tests.data.common import INT64_MAX, SEED, DAYS, MH_SIZES, cfg
from trainer.data.data_config import DataConfig
from trainer.data.loader import count_rows, make_batches
from trainer.data.multihot import MultiHotDay, MultiHotTables, multi_hot_spec
from trainer.data.npy import NpyDay
from trainer.data.npz import NpzDay


# ------------------------------------------------------------------------------------------------- npy

NPY_FILES = ("dense", "sparse", "labels", "oracle_logits")


def header_end(data: bytes) -> int:
    return data.index(b"\n") + 1  # np.save pads the header dict with spaces and ends it with a newline


def test_npy_truncated_or_extended_at_random_offsets(work: Path) -> None:
    rng = np.random.default_rng(SEED + 4)
    for name in NPY_FILES:
        path = work / f"day_0_{name}.npy"
        data = path.read_bytes()
        hdr = header_end(data)
        cuts = {0, 1, 5, 6, 7, 8, 9, 10, hdr // 2, hdr - 1, hdr, hdr + 1, len(data) - 1}
        cuts |= set(rng.integers(0, len(data), 8).tolist())
        variants = [data[:c] for c in sorted(cuts)] + [data + b"\0" * k for k in (1, 4, 8, 4096)]
        variants.append(b"\x93NUMPY" + data[6:hdr].replace(b"'descr'", b"'dscr' "))  # a broken header dict
        variants.append(b"not an npy file at all\n" * 10)
        for variant in variants:
            path.write_bytes(variant)
            with pytest.raises(ValueError) as err:
                NpyDay(str(work), 0)
            assert str(err.value).startswith(f"{path}: "), (name, len(variant), str(err.value))
        path.write_bytes(data)
    NpyDay(str(work), 0).read(0, DAYS[0])  # restored: reads again


def test_npy_header_rewritten_to_another_shape_or_dtype(work: Path) -> None:
    """Header edits of the same length (a different shape or dtype for the same file) are caught: by the
    file size, or by the expected dtype / shape."""
    edits = {
        "sparse": [(b"(12, 26)", b"(13, 26)"), (b"(12, 26)", b"(11, 26)"), (b"(12, 26)", b"(26, 12)"),
                   (b"'<i8'", b"'<f8'"), (b"'<i8'", b"'>i8'"), (b"'<i8'", b"'<u8'"), (b"'<i8'", b"'<i4'")],
        "dense": [(b"(12, 13)", b"(13, 12)"), (b"'<f4'", b"'<i4'"), (b"'<f4'", b"'>f4'"), (b"'<f4'", b"'<f2'")],
        "labels": [(b"(12, 1)", b"(1, 12)"), (b"'<i4'", b"'<f4'"), (b"(12, 1)", b"(6, 2)")],
    }
    for name, pairs in edits.items():
        path = work / f"day_0_{name}.npy"
        data = path.read_bytes()
        for old, new in pairs:
            assert data.count(old) == 1, (name, old)
            path.write_bytes(data.replace(old, new))
            with pytest.raises(ValueError) as err:
                NpyDay(str(work), 0)
            assert str(err.value).startswith(f"{path}: ") or "row counts differ" in str(err.value), (name, new)
            assert str(path) in str(err.value)
        path.write_bytes(data)


@pytest.mark.parametrize("name,bad,expected", [
    ("dense", np.zeros((12, 13), np.float16), "expected float32 array of shape (N, 13), found float16"),
    ("dense", np.zeros((12, 13, 1), np.float32), "found float32 array of shape (12, 13, 1)"),
    ("dense", np.zeros((12 * 13,), np.float32), "found float32 array of shape (156,)"),
    ("dense", np.zeros((12, 13), np.float64).view([("a", "<f8")]), "expected float32"),
    ("sparse", np.zeros((12, 26), np.uint64), "expected int32 or int64 array of shape (N, 26), found uint64"),
    ("sparse", np.zeros((12, 26), np.uint32), "found uint32"),
    ("sparse", np.zeros((12, 26), np.int16), "found int16"),
    ("sparse", np.zeros((12, 26), bool), "found bool"),
    ("sparse", np.zeros((12, 25), np.int64), "of shape (12, 25)"),
    ("sparse", np.zeros((12, 27), np.int64), "of shape (12, 27)"),
    ("sparse", np.zeros((12, 26, 1), np.int64), "of shape (12, 26, 1)"),
    ("labels", np.zeros((12, 1), bool), "expected integer array of shape (N, 1) or (N,), found bool"),
    ("labels", np.zeros((12, 1, 1), np.int32), "of shape (12, 1, 1)"),
    ("labels", np.zeros((), np.int32), "of shape ()"),
    ("oracle_logits", np.zeros((12, 1), np.float32), "expected float32 array of shape (N,)"),
    ("oracle_logits", np.zeros((12,), np.float64), "expected float32 array of shape (N,), found float64"),
])  # fmt: skip
def test_npy_wrong_dtype_or_shape_more(work: Path, name: str, bad: np.ndarray, expected: str) -> None:
    path = work / f"day_0_{name}.npy"
    np.save(path, bad)
    with pytest.raises(ValueError, match=re.escape(f"{path}: ") + ".*" + re.escape(expected)):
        NpyDay(str(work), 0)


def test_npy_pickled_objects_are_refused(work: Path) -> None:
    for name in ("dense", "sparse", "labels"):
        path = work / f"day_0_{name}.npy"
        original = path.read_bytes()
        np.save(path, np.array([[1, "a"]] * 12, dtype=object), allow_pickle=True)
        with pytest.raises(ValueError, match=re.escape(f"{path}: holds Python objects")):
            NpyDay(str(work), 0)
        path.write_bytes(original)


@pytest.mark.parametrize("name", ["dense", "sparse", "labels", "oracle_logits"])
@pytest.mark.parametrize("delta", [-1, 1, -12])
def test_npy_row_count_mismatch_or_empty(work: Path, name: str, delta: int) -> None:
    path = work / f"day_0_{name}.npy"
    array = np.load(path)
    rows = DAYS[0] + delta
    np.save(path, np.resize(array, (rows,) + array.shape[1:]))
    if rows == 0 and name == "dense":
        with pytest.raises(ValueError, match=re.escape(f"{path}: holds no rows")):
            NpyDay(str(work), 0)
        return
    with pytest.raises(ValueError, match=r"row counts differ between the files of one day \(.*" +
                       re.escape(f"{path}: {rows}")):
        NpyDay(str(work), 0)


def test_npy_missing_member_files(work: Path) -> None:
    for name in ("dense", "labels"):
        path = work / f"day_0_{name}.npy"
        data = path.read_bytes()
        os.remove(path)
        with pytest.raises(FileNotFoundError, match=re.escape(f"{path}: no such file")):
            NpyDay(str(work), 0)
        path.write_bytes(data)


def chunks(n: int, size: int) -> List[Tuple[int, int]]:
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def test_npy_bad_values_at_random_rows(clean: Path, work: Path) -> None:
    """One bad value at a seeded row and column: chunks before it read exactly as the clean day, the chunk
    holding it raises naming file, row and column."""
    rng = np.random.default_rng(SEED + 5)
    n = DAYS[0]
    reference = NpyDay(str(clean), 0)
    bad_values = [
        ("dense", [np.nan, np.inf, -np.inf], r"row {row} column {col}: value {value} is not finite"),
        ("sparse", [-1, -(2**63), -(2**31)], r"row {row} column {col} \(cat_{col}\): id {value} is negative"),
        ("labels", [2, -1, 255], r"row {row}: label {value} is not 0 or 1"),
        ("oracle_logits", [np.nan, np.inf], r"row {row}: value {value} is not finite"),
    ]
    for name, values, pattern in bad_values:
        path = work / f"day_0_{name}.npy"
        original = np.load(path)
        for value in values:
            array = original.copy()
            row = int(rng.integers(0, n))
            col = int(rng.integers(0, array.shape[1])) if array.ndim == 2 else 0
            array[(row, col) if array.ndim == 2 else row] = value
            np.save(path, array)
            day = NpyDay(str(work), 0)
            for a, b in chunks(n, 4):
                if a <= row < b:
                    message = pattern.format(row=row, col=col, value=re.escape(str(value)))
                    with pytest.raises(ValueError, match=re.escape(f"{path}: ") + message):
                        day.read(a, b)
                else:
                    got, want = day.read(a, b), reference.read(a, b)
                    assert np.array_equal(got.dense, want.dense) and np.array_equal(got.labels, want.labels)
                    assert all(np.array_equal(x, y) for x, y in zip(got.ids, want.ids))
        np.save(path, original)


def test_npy_huge_ids_and_skip_policy_does_not_hide_array_errors(work: Path) -> None:
    """The largest int64 ids come out unchanged; bad_rows=skip covers TSV rows only, so a bad id in an npy
    day is still an error (a skipped array row would shift every rank's batches)."""
    path = work / "day_0_sparse.npy"
    sparse = np.load(path)
    sparse[3, 5], sparse[4, 25] = INT64_MAX, 2**62 + 1
    np.save(path, sparse)
    chunk = NpyDay(str(work), 0).read(0, DAYS[0])
    assert chunk.ids[5][3] == INT64_MAX and chunk.ids[25][4] == 2**62 + 1
    sparse[7, 2] = -7
    np.save(path, sparse)
    with pytest.raises(ValueError, match=re.escape(f"{path}: row 7 column 2 (cat_2): id -7 is negative")):
        list(make_batches(cfg(work, format="npy", bad_rows="skip"), "train", 0, 1))


# ------------------------------------------------------------------------------------------------- npz

def npz_bytes(members: Dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def clean_members(clean: Path) -> Dict[str, np.ndarray]:
    with np.load(clean / "day_0_sparse_multi_hot.npz") as npz:
        return {k: npz[k] for k in npz.files}


def test_npz_truncated_at_random_offsets(work: Path) -> None:
    path = work / "day_0_sparse_multi_hot.npz"
    data = path.read_bytes()
    rng = np.random.default_rng(SEED + 6)
    cuts = {0, 1, 4, 30, len(data) // 2, len(data) - 22, len(data) - 1} | set(rng.integers(0, len(data), 12).tolist())
    for cut in sorted(cuts):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="^" + re.escape(f"{path}: not a readable zip/npz file")):
            NpzDay(str(work), 0)
    # a member's local header overwritten (the central directory still points at it)
    offset = zipfile.ZipFile(io.BytesIO(data)).getinfo("5.npy").header_offset
    path.write_bytes(data[:offset] + b"XXXX" + data[offset + 4:])
    with pytest.raises(ValueError, match=re.escape(f"{path}: member '5.npy': no zip local header")):
        NpzDay(str(work), 0)


def test_npz_corrupt_member_inside_an_intact_zip(clean: Path, work: Path) -> None:
    path = work / "day_0_sparse_multi_hot.npz"
    members = clean_members(clean)
    good = {f"{k}.npy": npy_bytes(v) for k, v in members.items()}
    hdr = header_end(good["7.npy"])
    broken = {
        "cut in the header": good["7.npy"][:hdr // 2],
        "cut in the data": good["7.npy"][:-3],
        "bytes appended": good["7.npy"] + b"\0" * 8,
        "garbage": b"garbage" * 30,
        "empty": b"",
        "shape edited": good["7.npy"].replace(b"(12, 2)", b"(13, 2)"),
        "pickled": npy_bytes(np.array([[1, "a"]] * 12, dtype=object)),
    }
    for what, data in broken.items():
        path.write_bytes(npz_bytes({**good, "7.npy": data}))
        with pytest.raises(ValueError, match=re.escape(f"{path}: member '7.npy'")):
            NpzDay(str(work), 0)


def test_npz_unknown_missing_or_renamed_members(clean: Path, work: Path) -> None:
    path = work / "day_0_sparse_multi_hot.npz"
    members = clean_members(clean)
    cases = [
        ({**members, "26": members["0"]}, r"missing \[\], unexpected \['26'\]"),
        ({f"cat_{k}": v for k, v in members.items()}, r"missing \['0', '1', .*unexpected \['cat_0', "),
        ({k: v for k, v in members.items() if k != "25"}, r"missing \['25'\], unexpected \[\]"),
        ({**{k: v for k, v in members.items() if k != "3"}, "03": members["3"]}, r"missing \['3'\], unexpected \['03'\]"),
        ({}, r"missing \['0', "),
    ]
    for arrays, message in cases:
        np.savez(path, **arrays)
        with pytest.raises(ValueError, match=re.escape(f"{path}: expected arrays '0'..'25', ") + message):
            NpzDay(str(work), 0)
    # a non-.npy entry (no array) is not a feature: ignored, the data still read exactly
    path.write_bytes(npz_bytes({**{f"{k}.npy": npy_bytes(v) for k, v in members.items()}, "README.txt": b"hi"}))
    chunk = NpzDay(str(work), 0).read(0, DAYS[0])
    assert all(np.array_equal(chunk.ids[f], members[str(f)].reshape(-1)) for f in range(26))


@pytest.mark.parametrize("bad,expected", [
    (np.zeros((12, 2), np.uint32), "found uint32"), (np.zeros((12, 2), np.int16), "found int16"),
    (np.zeros((12, 2), np.float64), "found float64"), (np.zeros((12, 2), bool), "found bool"),
    (np.zeros((12, 2), ">i4"), "found >i4"), (np.zeros((12,), np.int32), "of shape (12,)"),
    (np.zeros((12, 2, 1), np.int32), "of shape (12, 2, 1)"), (np.zeros((12, 0), np.int32), "of shape (12, 0)"),
])  # fmt: skip
def test_npz_member_wrong_dtype_or_shape(clean: Path, work: Path, bad: np.ndarray, expected: str) -> None:
    path = work / "day_0_sparse_multi_hot.npz"
    np.savez(path, **{**clean_members(clean), "11": bad})
    with pytest.raises(ValueError, match=re.escape(f"{path}['11']: expected int32 or int64 array of shape (N, size_f) "
                                                   "with size_f >= 1, ") + ".*" + re.escape(expected)):
        NpzDay(str(work), 0)


def test_npz_negative_ids_at_random_positions(clean: Path, work: Path) -> None:
    path = work / "day_0_sparse_multi_hot.npz"
    members = clean_members(clean)
    reference = NpzDay(str(clean), 0)
    rng = np.random.default_rng(SEED + 7)
    for value in (-1, -(2**31)):
        f = int(rng.integers(0, 26))
        row, col = int(rng.integers(0, DAYS[0])), int(rng.integers(0, MH_SIZES[f]))
        bad = members[str(f)].copy()
        bad[row, col] = value
        np.savez(path, **{**members, str(f): bad})
        day = NpzDay(str(work), 0)
        for a, b in chunks(DAYS[0], 5):
            if a <= row < b:
                with pytest.raises(ValueError, match=re.escape(
                        f"{path}['{f}']: row {row} column {col} (cat_{f}): id {value} is negative")):
                    day.read(a, b)
            else:
                got, want = day.read(a, b), reference.read(a, b)
                assert all(np.array_equal(x, y) for x, y in zip(got.ids, want.ids))
                assert np.array_equal(got.lengths, want.lengths)


# ------------------------------------------------------------------------------------------- multi-hot

@pytest.mark.parametrize("text,expected", [
    ('{"num_embeddings_per_feature": [5, 5', "not valid JSON"),
    ("", "not valid JSON"),
    ('{"num_embeddings_per_feature": [5, 5]}', r"num_embeddings_per_feature=\[5, 5\]: expected 26 integers >= 1"),
    ('{"num_embeddings_per_feature": [' + ", ".join(["5"] * 25 + ["1.5"]) + "]}", r"1\.5\]: expected 26 integers"),
    ('{"num_embeddings_per_feature": [' + ", ".join(["5"] * 25 + ['"7"']) + "]}", r"'7'\]: expected 26 integers"),
    ('{"num_embeddings_per_feature": [' + ", ".join(["5"] * 25 + ["true"]) + "]}", r"True\]: expected 26"),
    ('{"num_embeddings_per_feature": [' + ", ".join(["5"] * 25 + ["0"]) + "]}", r"0\]: expected 26 integers"),
    ('{"num_embeddings_per_feature": [' + ", ".join(["5"] * 25 + ["-2"]) + "]}", r"-2\]: expected 26 integers"),
    ('{"num_embeddings_per_feature": 5}', r"num_embeddings_per_feature=5: expected 26"),
])  # fmt: skip
def test_multi_hot_table_sizes_from_a_bad_manifest(work: Path, text: str, expected: str) -> None:
    (work / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(work / "manifest.json")) + ".*" + expected):
        multi_hot_spec(cfg(work, format="npy", multi_hot_sizes=MH_SIZES))
    for text in ("[1, 2]", '{"other": 1}'):  # no sizes given at all: the message says which setting to add
        (work / "manifest.json").write_text(text)
        with pytest.raises(ValueError, match=r"data\.num_embeddings_per_feature .*manifest\.json gives none"):
            multi_hot_spec(cfg(work, format="npy", multi_hot_sizes=MH_SIZES))


def test_multi_hot_on_the_fly_with_extreme_ids_is_exact(work: Path) -> None:
    path = work / "day_0_sparse.npy"
    sparse = np.load(path)
    extremes = [INT64_MAX, 2**63 - 2, 2**32, 2**31, 2**31 - 1, 0, 1]
    sparse[: len(extremes), 4] = extremes
    np.save(path, sparse)
    tables = [7 + f for f in range(26)]
    spec = multi_hot_spec(cfg(work, format="npy", multi_hot_sizes=MH_SIZES, num_embeddings_per_feature=tables))
    assert spec is not None
    chunk = MultiHotDay(NpyDay(str(work), 0), MultiHotTables(spec)).read(0, DAYS[0])
    ids = chunk.ids[4].reshape(DAYS[0], MH_SIZES[4])
    assert ids[:, 0].tolist() == [int(x) % tables[4] for x in sparse[:, 4].tolist()]  # Python ints: no overflow
    assert ((ids >= 0) & (ids < tables[4])).all()


@pytest.mark.parametrize("over,match", [
    ({"multi_hot_sizes": [0] * 26}, "data.multi_hot_sizes"), ({"multi_hot_sizes": [2] * 27}, "data.multi_hot_sizes"),
    ({"multi_hot_sizes": [-1] + [1] * 25}, "data.multi_hot_sizes"),
    ({"num_embeddings_per_feature": [5] * 25}, "data.num_embeddings_per_feature"),
])  # fmt: skip
def test_multi_hot_settings_out_of_range(over: Dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match) + "="):
        DataConfig(format="npy", **over)  # type: ignore[arg-type]


def test_npz_sizes_disagreeing_with_settings_name_the_file(work: Path) -> None:
    tables = [50] * 26
    wrong = [2] * 26
    with pytest.raises(ValueError, match=re.escape(f"{work / 'day_0_sparse_multi_hot.npz'}: holds {MH_SIZES}")):
        count_rows(cfg(work, format="npz", multi_hot_sizes=wrong, num_embeddings_per_feature=tables), "train")
