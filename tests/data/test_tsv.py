"""Raw Criteo TSV parsing: missing values, negatives, Kaggle test format, bad rows, TorchRec's transform."""

from __future__ import annotations

import logging
import os
import re
from typing import List, Optional

import numpy as np
import pytest

from trainer.data import tsv
from trainer.data.records import DENSE_MIN, dense_transform

CATS = [f"{(0x1000 * (i + 1) + 7):08x}" for i in range(26)]
DENSE = [str(i) for i in range(13)]


def line(label: Optional[str] = "1", dense: Optional[List[str]] = None, cats: Optional[List[str]] = None) -> str:
    fields = ([] if label is None else [label]) + (dense or list(DENSE)) + (cats or list(CATS))
    return "\t".join(fields) + "\n"


def write(path: str, lines: List[str]) -> str:
    with open(path, "w") as fout:
        fout.writelines(lines)
    return path


def parse_file(path: str, has_label: bool = True, policy: str = "error") -> List[tsv.Row]:
    parser = tsv.TsvParser(path, has_label, policy)
    return [row for _, _, row in tsv.iter_rows(tsv.TsvSegment(path), parser, lambda j: True) if row is not None]


def test_missing_dense_and_categorical(tmp_path: "os.PathLike[str]") -> None:
    dense = list(DENSE)
    dense[0] = ""
    cats = list(CATS)
    cats[2] = ""
    cats[25] = ""  # last field empty: the line ends in a tab
    path = write(os.path.join(tmp_path, "day_0"), [line("0", dense, cats), line("1")])
    rows = parse_file(path)
    assert rows[0][0] == 0 and rows[0][1][0] == 0 and rows[0][2][2] == -1 and rows[0][2][25] == -1
    chunk = tsv.rows_to_chunk(rows)
    assert chunk.lengths[:, 0].tolist() == [0 if f in (2, 25) else 1 for f in range(26)]
    assert chunk.lengths[:, 1].tolist() == [1] * 26
    assert chunk.ids[2].tolist() == [int(CATS[2], 16)]  # only row 1 contributes: no fake id for the gap
    assert chunk.ids[0].tolist() == [int(CATS[0], 16)] * 2
    batch = chunk.to_batch()
    kjt = batch.sparse_features
    assert kjt.stride() == 2 and kjt.keys()[2] == "cat_2"
    assert kjt.to_dict()["cat_2"].lengths().tolist() == [0, 1]
    assert str(batch.dense_features.dtype) == "torch.float32" and batch.dense_features.shape == (2, 13)
    assert batch.dense_features[0, 0].item() == pytest.approx(np.log(0 - DENSE_MIN + 2))
    assert batch.labels.tolist() == [0.0, 1.0]


def test_negative_dense_and_transform_values(tmp_path: "os.PathLike[str]") -> None:
    dense = list(DENSE)
    dense[1], dense[2] = "-3", "-2"
    path = write(os.path.join(tmp_path, "d"), [line("1", dense)])
    chunk = tsv.rows_to_chunk(parse_file(path))
    assert chunk.dense[0, 1] == np.float32(np.log(2.0)) and chunk.dense[0, 2] == np.float32(np.log(3.0))
    assert chunk.dense[0, 3] == np.float32(np.log(3 + 5))
    assert np.isfinite(dense_transform(np.array([-100, 0, 2**40]))).all()


def test_dense_and_ids_match_torchrec_preprocessing(tmp_path: "os.PathLike[str]") -> None:
    """TorchRec's own tsv_to_npys on the same file gives the same dense values bit for bit (its file minimum
    is -3, as on real Criteo), the same raw ids and labels."""
    from torchrec.datasets.criteo import BinaryCriteoUtils

    rng = np.random.default_rng(0)
    lines = []
    for i in range(50):
        dense = [str(int(v)) for v in rng.integers(0, 10**6, 13)]
        dense[1] = str(int(rng.integers(-3, 5)))
        if i % 3 == 0:
            dense[4] = ""
        cats = [f"{int(v):08x}" for v in rng.integers(0, 2**32, 26)]
        lines.append(line(str(i % 2), dense, cats))
    lines[7] = line("1", ["-3"] + DENSE[1:])
    path = write(os.path.join(tmp_path, "day_0"), lines)
    out = [os.path.join(tmp_path, f"{n}.npy") for n in ("dense", "sparse", "labels")]
    BinaryCriteoUtils.tsv_to_npys(path, *out)
    chunk = tsv.rows_to_chunk(parse_file(path))
    np.testing.assert_array_equal(chunk.dense, np.load(out[0]))
    assert chunk.dense.dtype == np.float32
    np.testing.assert_array_equal(np.stack(chunk.ids, axis=1), np.load(out[1]))
    np.testing.assert_array_equal(chunk.labels, np.load(out[2]).reshape(-1))


def test_hex_range(tmp_path: "os.PathLike[str]") -> None:
    cats = list(CATS)
    cats[0], cats[1], cats[2] = "ffffffff", "7fffffffffffffff", "ABCDEF01"
    path = write(os.path.join(tmp_path, "d"), [line("1", None, cats)])
    row = parse_file(path)[0]
    assert row[2][:3] == [2**32 - 1, 2**63 - 1, 0xABCDEF01]
    cats[6] = "ffffffffffffffff"
    write(path, [line("1"), line("1", None, cats)])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: column C7 value 'ffffffffffffffff' does not fit")):
        parse_file(path)


def test_kaggle_test_format(tmp_path: "os.PathLike[str]") -> None:
    path = write(os.path.join(tmp_path, "test.txt"), [line(None), line(None)])
    rows = parse_file(path, has_label=False)
    assert [r[0] for r in rows] == [-1, -1] and rows[0][1] == [int(v) for v in DENSE]
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: has 39 columns, expected 40")):
        parse_file(path, has_label=True)


BAD = [  # (field index in the 40-column line, token, expected message fragment)
    (20, "zz12", "column C7 value 'zz12' is not hex"),
    (20, "0x1f", "column C7 value '0x1f' is not hex"),
    (20, "1_f", "column C7 value '1_f' is not hex"),
    (20, "12345678901234567", "column C7 value '12345678901234567' is not hex"),
    (3, "nan", "column I3 value 'nan' is not an integer"),
    (3, "inf", "column I3 value 'inf' is not an integer"),
    (3, "1.5", "column I3 value '1.5' is not an integer"),
    (3, " 4", "column I3 value ' 4' is not an integer"),
    (0, "2", "column label value '2' is not 0 or 1"),
    (0, "", "column label value '' is not 0 or 1"),
]


@pytest.mark.parametrize("field,token,message", BAD)
def test_bad_row_raises_with_file_line_column(tmp_path: "os.PathLike[str]", field: int, token: str,
                                              message: str) -> None:
    fields = line().rstrip("\n").split("\t")
    fields[field] = token
    path = write(os.path.join(tmp_path, "day_3"), [line(), line(), "\t".join(fields) + "\n"])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: {message}")):
        parse_file(path)


def test_wrong_column_count_and_blank_line(tmp_path: "os.PathLike[str]") -> None:
    path = write(os.path.join(tmp_path, "d"), [line(), line().replace("\t", "", 1)])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: has 39 columns, expected 40")):
        parse_file(path)
    write(path, [line(), "\n", line()])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: has 1 columns")):
        parse_file(path)


def test_skip_policy_counts_reasons(tmp_path: "os.PathLike[str]", caplog: pytest.LogCaptureFixture) -> None:
    good = [line(str(i % 2), [str(i)] + DENSE[1:]) for i in range(5)]
    bad_hex = line().replace(CATS[3], "xyz")
    bad_dense = line("1", ["nan"] + DENSE[1:])
    bad_label = line("7")
    short = "1\t2\t3\n"
    path = write(os.path.join(tmp_path, "d"),
                 [good[0], bad_hex, good[1], short, good[2], bad_dense, bad_hex, good[3], bad_label, good[4]])
    parser = tsv.TsvParser(path, True, "skip")
    with caplog.at_level(logging.WARNING, logger="trainer.data.tsv"):
        got = list(tsv.iter_rows(tsv.TsvSegment(path), parser, lambda j: True))
    assert [j for j, _, _ in got] == [0, 1, 2, 3, 4]
    assert [index for _, index, _ in got] == [0, 2, 4, 7, 9]  # line indices of the good rows
    assert [row[1][0] for _, _, row in got if row is not None] == [0, 1, 2, 3, 4]
    assert dict(parser.counts) == {"categorical": 2, "column_count": 1, "dense": 1, "label": 1}
    assert f"{path}:2: column C4 value 'xyz' is not hex" in caplog.text
    assert tsv.count_rows(tsv.TsvSegment(path), True, "skip") == 5
    assert tsv.count_rows(tsv.TsvSegment(path), True, "error") == 10


def test_count_lines_and_row_window(tmp_path: "os.PathLike[str]") -> None:
    path = write(os.path.join(tmp_path, "d"), [line(str(i % 2), [str(i)] + DENSE[1:]) for i in range(7)])
    assert tsv.count_lines(path) == 7
    with open(path, "a") as fout:
        fout.write(line("1").rstrip("\n"))  # last line without newline still counts
    assert tsv.count_lines(path, block_bytes=16) == 8
    seg = tsv.TsvSegment(path, line_start=1, line_stop=7, row_start=2, row_stop=5)
    parser = tsv.TsvParser(path)
    got = [(j, i, r[1][0] if r else None) for j, i, r in tsv.iter_rows(seg, parser, lambda j: j != 1)]
    assert got == [(0, 3, 3), (1, 4, None), (2, 5, 5)]
    assert tsv.count_rows(seg, True, "error") == 3
    # a last line without a line end may be cut inside its last field: never parsed as a row
    with pytest.raises(ValueError, match=re.escape(f"{path}:8: has no line end")):
        parse_file(path)
    assert len(parse_file(path, policy="skip")) == 7
