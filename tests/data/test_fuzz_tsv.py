"""Fuzzing the data readers with malformed input, deterministically (seeded): the TSV cases
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

import collections
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

from tests.data.common import (
    INT64_MAX,
    SEED,
    DAYS,
    DENSE_COLS,
    CAT_COLS,
    key_of,
    cfg,
    parse,
    lines_of,
    write_lines,
    assert_same_batches,
)
from trainer.data import tsv
from trainer.data.data_config import DataConfig
from trainer.data.loader import count_rows, make_batches


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
            stream = make_batches(skip, split, rank, 2)
            got = list(stream)
            report[split] = dict(stream.bad_row_counts)
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
    stream = make_batches(skip, "train", 0, 1)
    keys = [b.sparse_features.to_dict()["cat_0"].values().tolist()[0] for b in stream]
    assert keys == [key_of(0, i) for i in range(7)] + [key_of(1, i) for i in range(9)]
    assert dict(stream.bad_row_counts) == {"truncated": 1}
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
