"""Fuzzing the data readers with malformed input, deterministically (seeded).

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

import collections
import io
import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Counter, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch

from trainer.data import tsv
from trainer.data.config import DataConfig
from trainer.data.loader import count_rows, make_batches, skip_report
from trainer.data.multihot import MultiHotDay, MultiHotTables, multi_hot_spec
from trainer.data.npy import NpyDay
from trainer.data.npz import NpzDay
from trainer.data.types import Batch, dense_transform

SEED = 20240611
DAYS = {0: 12, 1: 9, 2: 10}  # rows per day: 0 and 1 train, 2 eval (val 5 rows, test 5)
MH_SIZES = [1 + f % 3 for f in range(26)]  # multi-hot ids per sample in the npz files
DENSE_COLS = [f"I{i + 1}" for i in range(13)]
CAT_COLS = [f"C{i + 1}" for i in range(26)]
INT64_MAX = 2**63 - 1


def key_of(day: int, row: int) -> int:
    return day * 1000 + row  # stored as cat_0: identifies a row in every format


def write_dataset(directory: Path, oracle: bool = True) -> None:
    """The same rows as raw TSV, TorchRec npy, MLPerf multi-hot npz and (optionally) oracle logits."""
    rng = np.random.default_rng(SEED)
    for day, n in DAYS.items():
        raw = rng.integers(-3, 500, (n, 13))
        missing = rng.random((n, 13)) < 0.2
        raw[missing] = 0
        ids = rng.integers(0, 2**32, (n, 26))
        ids[:, 0] = [key_of(day, i) for i in range(n)]
        labels = rng.integers(0, 2, n)
        with open(directory / f"day_{day}", "w") as fout:
            for i in range(n):
                dense = ["" if missing[i, c] else str(raw[i, c]) for c in range(13)]
                fout.write("\t".join([str(labels[i])] + dense + [f"{v:08x}" for v in ids[i]]) + "\n")
        np.save(directory / f"day_{day}_dense.npy", dense_transform(raw))
        np.save(directory / f"day_{day}_sparse.npy", ids.astype(np.int64))
        np.save(directory / f"day_{day}_labels.npy", labels.astype(np.int32).reshape(n, 1))
        np.savez(directory / f"day_{day}_sparse_multi_hot.npz",
                 **{str(f): (ids[:, f:f + 1] % (2**31 - 8) + np.arange(s)).astype(np.int32)
                    for f, s in enumerate(MH_SIZES)})
        if oracle:
            np.save(directory / f"day_{day}_oracle_logits.npy", rng.normal(size=n).astype(np.float32))


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unmutated dataset (never written to by a test)."""
    directory = tmp_path_factory.mktemp("fuzz-clean")
    write_dataset(directory)
    return directory


@pytest.fixture
def work(clean: Path, tmp_path: Path) -> Path:
    """A private copy of the clean dataset to mutate."""
    directory = tmp_path / "ds"
    shutil.copytree(clean, directory)
    return directory


def cfg(path: Path, **kw: Any) -> DataConfig:
    return DataConfig(**{"path": str(path), "train_days": [0, 1], "eval_day": 2, "batch_size": 3,
                         "eval_batch_size": 2, **kw})


def parse(path: Path, policy: str = "error", has_label: bool = True) -> Tuple[List[tsv.Row], Dict[str, int]]:
    """Every parsed row of a TSV file and the skip counts."""
    parser = tsv.TsvParser(str(path), has_label, policy)
    rows = [row for _, _, row in tsv.iter_rows(tsv.TsvSegment(str(path)), parser, lambda j: True) if row is not None]
    return rows, dict(parser.counts)


def lines_of(path: Path) -> List[str]:
    with open(path, newline="") as fin:
        return fin.readlines()


def write_lines(path: Path, lines: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fout:
        fout.writelines(lines)


def batch_data(batch: Batch) -> Dict[str, Any]:
    jt = batch.sparse_features.to_dict()
    out: Dict[str, Any] = {"dense": batch.dense_features, "labels": batch.labels, "valid": batch.valid,
                           "oracle": batch.oracle_logits}
    out.update({k: (v.values(), v.lengths()) for k, v in jt.items()})
    return out


def assert_same_batches(got: Sequence[Batch], expected: Sequence[Batch]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        a, b = batch_data(g), batch_data(e)
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], tuple):
                assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]), k
            elif a[k] is None or b[k] is None:
                assert a[k] is None and b[k] is None, k
            else:
                assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------- TSV

def with_field(line: str, index: int, token: str) -> str:
    fields = line.rstrip("\n").split("\t")
    fields[index] = token
    return "\t".join(fields) + "\n"


# (token, what the message says after "value {token!r}") per column kind; every token is tried in every column
BAD_LABELS = ["2", "-1", "", "0.0", "1.0", "true", "01", " 1", "1 ", "x", "\u0661", "é"]
BAD_DENSE = [
    ("nan", "is not an integer"), ("NaN", "is not an integer"), ("inf", "is not an integer"),
    ("-inf", "is not an integer"), ("1.5", "is not an integer"), ("1e3", "is not an integer"),
    ("0x10", "is not an integer"), ("abc", "is not an integer"), ("--1", "is not an integer"),
    ("+5", "is not an integer"), ("1 ", "is not an integer"), (" 1", "is not an integer"),
    ("1_000", "is not an integer"), ("\uff11", "is not an integer"), ("9" * 20, "is not an integer"),
    ("9223372036854775808", "does not fit int64"), ("-9223372036854775808", "does not fit int64"),
    ("\x00", "is not an integer"),
]  # fmt: skip
BAD_CATS = [
    ("xyz", "is not hex"), ("0x1f", "is not hex"), ("-1", "is not hex"), ("-1a", "is not hex"),
    (" ab", "is not hex"), ("ab ", "is not hex"), ("g", "is not hex"), ("1_f", "is not hex"),
    ("1" * 17, "is not hex"), ("é", "is not hex"), ("\x00", "is not hex"),
    ("8000000000000000", "does not fit int64"), ("ffffffffffffffff", "does not fit int64"),
]  # fmt: skip


def shown(token: str) -> str:
    """The token as the reader sees it (ASCII with U+FFFD for other bytes), repr'd as in the messages."""
    return repr(token.encode("utf-8").decode("ascii", errors="replace"))


def token_cases() -> List[Tuple[int, str, str, str]]:
    """(field index, token, reason, message after 'file:line: ') for every bad token in every column."""
    cases = [(0, t, "label", f"column label value {shown(t)} is not 0 or 1") for t in BAD_LABELS]
    for c, col in enumerate(DENSE_COLS):
        cases += [(1 + c, t, "dense", f"column {col} value {shown(t)} {why}") for t, why in BAD_DENSE]
    for c, col in enumerate(CAT_COLS):
        cases += [(14 + c, t, "categorical", f"column {col} value {shown(t)} {why}") for t, why in BAD_CATS]
    return cases


def shape_cases(good: str) -> List[Tuple[str, str]]:
    """(bad line, message) for lines with a wrong number of columns."""
    fields = good.rstrip("\n").split("\t")
    return [
        ("\t".join(fields[:-1]) + "\n", "has 39 columns, expected 40"),
        ("\t".join(fields[1:]) + "\n", "has 39 columns, expected 40"),  # label dropped
        ("\t".join(fields + ["0"]) + "\n", "has 41 columns, expected 40"),
        (good.rstrip("\n") + "\t\n", "has 41 columns, expected 40"),  # trailing tab
        (good.rstrip("\n") + "\r" + good, "has 79 columns, expected 40"),  # two rows joined by a lone CR
        ("\n", "has 1 columns, expected 40"),
        ("\r\n", "has 1 columns, expected 40"),
        (" ".join(fields) + "\n", "has 1 columns, expected 40"),  # spaces, not tabs
        (",".join(fields) + "\n", "has 1 columns, expected 40"),  # CSV
        ("\t" * 39 + "\t\n", "has 41 columns, expected 40"),
    ]


def test_tsv_bad_token_in_every_column_names_file_line_and_column(clean: Path, tmp_path: Path) -> None:
    good = lines_of(clean / "day_0")
    rng = np.random.default_rng(SEED)
    path = tmp_path / "day_0"
    cases = token_cases()
    assert len(cases) == len(BAD_LABELS) + 13 * len(BAD_DENSE) + 26 * len(BAD_CATS)
    for field, token, reason, message in cases:
        at = int(rng.integers(0, len(good) + 1))
        mutated = list(good)
        mutated.insert(at, with_field(good[min(at, len(good) - 1)], field, token))
        write_lines(path, mutated)
        with pytest.raises(ValueError) as err:
            parse(path)
        assert str(err.value) == f"{path}:{at + 1}: {message}", (field, token)
        rows, counts = parse(path, "skip")
        assert counts == {reason: 1}, (field, token)
        assert rows == parse(clean / "day_0")[0], (field, token)  # the good rows, exactly


def test_tsv_wrong_column_counts(clean: Path, tmp_path: Path) -> None:
    good = lines_of(clean / "day_1")
    rng = np.random.default_rng(SEED + 1)
    path = tmp_path / "day_1"
    for bad, message in shape_cases(good[3]):
        at = int(rng.integers(0, len(good) + 1))
        write_lines(path, good[:at] + [bad] + good[at:])
        with pytest.raises(ValueError, match="^" + re.escape(f"{path}:{at + 1}: {message}") + "$"):
            parse(path)
        rows, counts = parse(path, "skip")
        assert counts == {"column_count": 1} and rows == parse(clean / "day_1")[0], repr(bad)
    # Kaggle test.txt (no label column) given a labelled file, and the reverse
    write_lines(path, good)
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: has 40 columns, expected 39")):
        parse(path, has_label=False)


def test_tsv_truncated_at_random_byte_offsets(clean: Path, tmp_path: Path) -> None:
    """A cut anywhere: the rows before it come out exactly; a cut inside a line (even inside the last
    column, where the row would still have 40 columns) is an error or a counted "truncated" skip."""
    data = (clean / "day_0").read_bytes()
    original = parse(clean / "day_0")[0]
    rng = np.random.default_rng(SEED + 2)
    last_line = data.rindex(b"\n", 0, len(data) - 1) + 1
    cuts = set(range(last_line, len(data) + 1)) | set(rng.integers(1, len(data), 80).tolist())
    path = tmp_path / "day_0"
    for cut in sorted(cuts):
        path.write_bytes(data[:cut])
        complete = data.count(b"\n", 0, cut)
        partial = data[cut - 1:cut] != b"\n"
        rows, counts = parse(path, "skip")
        assert rows == original[:complete], cut
        assert counts == ({"truncated": 1} if partial else {}), cut
        if partial:
            with pytest.raises(ValueError, match="^" + re.escape(f"{path}:{complete + 1}: has no line end")):
                parse(path)
        else:
            assert parse(path)[0] == original[:complete]


def test_tsv_valid_edge_values_parse_exactly(tmp_path: Path) -> None:
    """Extremes that are valid must give exactly their values, never a clamp, a wrap or a NaN."""
    base = ["1"] + [str(i) for i in range(13)] + [f"{i + 1:x}" for i in range(26)]

    def variant(**at: str) -> List[str]:
        fields = list(base)
        for name, token in at.items():
            fields[{"label": 0, **{c: 1 + i for i, c in enumerate(DENSE_COLS)},
                    **{c: 14 + i for i, c in enumerate(CAT_COLS)}}[name]] = token
        return fields

    cases = [
        (variant(C1="7fffffffffffffff", C2="0", C3="00000000", C4="ABCdef", C5="0000000000000001"),
         lambda r: r[2][:5] == [INT64_MAX, 0, 0, 0xABCDEF, 1]),
        (variant(I1="9223372036854775807", I2="-9223372036854775807", I3="007", I4="-0", I5="-3"),
         lambda r: r[1][:5] == [INT64_MAX, -INT64_MAX, 7, 0, -3]),
        (variant(I1="", I13="", C1="", C26=""), lambda r: r[1][0] == 0 and r[1][12] == 0 and r[2][0] == r[2][25] == -1),
        (variant(label="0"), lambda r: r[0] == 0),
    ]
    all_empty = ["0"] + [""] * 39  # every value missing: all bags empty, dense all 0
    path = tmp_path / "d"
    lines = ["\t".join(f) + "\n" for f, _ in cases] + ["\t".join(base) + "\r\n", "\t".join(all_empty) + "\n"]
    write_lines(path, lines)
    rows, counts = parse(path, "skip")
    assert counts == {} and len(rows) == len(lines)
    for row, (_, check) in zip(rows, cases):
        assert check(row), row
    assert rows[len(cases)] == (1, list(range(13)), list(range(1, 27)))  # CRLF line end
    assert rows[-1] == (0, [0] * 13, [-1] * 26)
    chunk = tsv.rows_to_chunk(rows)
    assert np.isfinite(chunk.dense).all()  # an int64-max dense value does not wrap to NaN in the transform
    assert chunk.dense[1, 0] == np.float32(np.log(np.float32(2.0**63)))
    assert chunk.lengths[:, -1].tolist() == [0] * 26  # empty bags, no fake id
    assert chunk.ids[0].tolist() == [INT64_MAX, 1, 1, 1]  # row 2 (C1 empty) and the last add none
    assert chunk.lengths[:, 2].tolist() == [0] + [1] * 24 + [0]


def test_tsv_skip_policy_through_the_loader(clean: Path, work: Path) -> None:
    """Bad lines of every kind in every day: with bad_rows=skip the batches of every split equal those of the
    clean dataset and the skip report counts each reason; with "error" the first bad line stops the stream."""
    rng = np.random.default_rng(SEED + 3)
    tokens = token_cases()
    expected: Dict[int, List[Tuple[int, str]]] = {}  # day -> [(line index in the mutated file, reason)]
    plain = work.parent / "plain"  # the clean days without oracle logits (one per line: lines != rows now)
    shutil.copytree(clean, plain)
    for day in DAYS:
        items: List[Tuple[str, Optional[str]]] = [(line, None) for line in lines_of(clean / f"day_{day}")]
        bad: List[Tuple[str, Optional[str]]] = [(b, "column_count") for b, _ in shape_cases(items[0][0])[:4]]
        for i in rng.choice(len(tokens), 6, replace=False):
            field, token, reason, _ = tokens[i]
            bad.append((with_field(items[0][0], field, token), reason))
        for item in bad:
            items.insert(int(rng.integers(0, len(items) + 1)), item)
        expected[day] = [(i, reason) for i, (_, reason) in enumerate(items) if reason is not None]
        write_lines(work / f"day_{day}", [line for line, _ in items])
        os.remove(work / f"day_{day}_oracle_logits.npy")
        os.remove(plain / f"day_{day}_oracle_logits.npy")

    first_bad = min(i for i, _ in expected[0])
    with pytest.raises(ValueError, match=re.escape(f"{work / 'day_0'}:{first_bad + 1}: ")):
        list(make_batches(cfg(work, format="tsv"), "train", 0, 1))
    skip, good = cfg(work, format="tsv", bad_rows="skip"), cfg(plain, format="tsv")
    report: Dict[str, Dict[str, int]] = {}
    for split in ("train", "val", "test"):
        assert count_rows(skip, split) == count_rows(good, split) == count_rows(cfg(clean), split)
        for rank in range(2):
            got = list(make_batches(skip, split, rank, 2))
            report[split] = skip_report().get(split, {})  # before the clean stream replaces the split's entry
            assert_same_batches(got, list(make_batches(good, split, rank, 2)))
    train = collections.Counter(r for day in (0, 1) for _, r in expected[day])
    assert report["train"] == dict(train)
    # an eval stream parses its day from the start: test counts every bad line of the day (those before its
    # rows too), val those before its last row (where it stops reading)
    assert report["test"] == dict(collections.Counter(r for _, r in expected[2]))
    bad_lines = {i for i, _ in expected[2]}
    good_lines = [i for i in range(DAYS[2] + len(bad_lines)) if i not in bad_lines]
    last_val_line = good_lines[(DAYS[2] + 1) // 2 - 1]
    assert report["val"] == dict(collections.Counter(r for i, r in expected[2] if i < last_val_line))


def test_tsv_truncated_or_empty_day_through_the_loader(clean: Path, work: Path) -> None:
    data = (clean / "day_0").read_bytes()
    offsets = [i for i, b in enumerate(data) if b == ord("\n")]
    cut = offsets[6] + 1 + 100  # inside line 8
    (work / "day_0").write_bytes(data[:cut])
    # with the oracle logits (synthetic data) a cut is found even at a line end: the oracle is longer
    with pytest.raises(ValueError, match=re.escape(f"{work / 'day_0'}: has 8 lines but ") + ".*holds 12 values"):
        make_batches(cfg(work, format="tsv"), "train", 0, 1)
    (work / "day_0").write_bytes(data[:offsets[6] + 1])
    with pytest.raises(ValueError, match=re.escape(f"{work / 'day_0'}: has 7 lines but ")):
        make_batches(cfg(work, format="tsv"), "train", 0, 1)
    for day in DAYS:
        os.remove(work / f"day_{day}_oracle_logits.npy")
    (work / "day_0").write_bytes(data[:cut])
    with pytest.raises(ValueError, match=re.escape(f"{work / 'day_0'}:8: has no line end")):
        list(make_batches(cfg(work, format="tsv"), "train", 0, 1))
    skip = cfg(work, format="tsv", bad_rows="skip", batch_size=1)
    keys = [b.sparse_features.to_dict()["cat_0"].values().tolist()[0] for b in make_batches(skip, "train", 0, 1)]
    assert keys == [key_of(0, i) for i in range(7)] + [key_of(1, i) for i in range(9)]
    assert skip_report()["train"] == {"truncated": 1}
    (work / "day_0").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{work / 'day_0'}: empty file")):
        make_batches(cfg(work, format="tsv"), "train", 0, 1)
    os.remove(work / "day_0")
    with pytest.raises(FileNotFoundError, match=re.escape(str(work / "day_0"))):
        make_batches(cfg(work, format="tsv"), "train", 0, 1)
    (work / "k.txt").write_bytes(data[:offsets[3] + 1])  # 4 lines cannot make 7 days
    kaggle = DataConfig(format="tsv", path=str(work), kaggle_file="k.txt", batch_size=1, eval_batch_size=1)
    with pytest.raises(ValueError, match=re.escape(f"{work / 'k.txt'}: 4 lines cannot be cut into data.num_days=7")):
        count_rows(kaggle, "train")


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
