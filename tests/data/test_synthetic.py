"""Tests of the synthetic Criteo-like click-log generator (trainer.data.synthetic)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainer.data.synthetic import (
    CAT_FIELDS, PRESETS, SyntheticConfig, auc, generate, get_preset, preset_config, token_of,
)  # fmt: skip
from trainer.data.synthetic.field_layout import CAT_MISSING_GROUPS, DENSE_MISSING_GROUPS

COL = {f: i for i, f in enumerate(CAT_FIELDS)}


class Data:
    """A generated dataset loaded into memory (small enough for tests)."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path, self.m = path, manifest
        days = range(manifest["num_days"])
        self.sparse = [np.load(path / f"day_{i}_sparse.npy") for i in days]
        self.dense = [np.load(path / f"day_{i}_dense.npy") for i in days]
        self.labels = [np.load(path / f"day_{i}_labels.npy") for i in days]
        self.logits = [np.load(path / f"day_{i}_oracle_logits.npy") for i in days]
        self.S = np.concatenate(self.sparse)
        self.Y = np.concatenate(self.labels)[:, 0]
        self.Z = np.concatenate(self.logits).astype(np.float64)

    def col(self, field: str) -> np.ndarray:
        return self.S[:, COL[field]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Data:
    path = tmp_path_factory.mktemp("tiny")
    return Data(path, generate(preset_config("tiny"), path))


@pytest.fixture(scope="module")
def tiny_control(tmp_path_factory: pytest.TempPathFactory) -> Data:
    path = tmp_path_factory.mktemp("tiny_control")
    return Data(path, generate(preset_config("tiny-control"), path))


def _mini(**over: Any) -> SyntheticConfig:
    """A very small config for file-level tests."""
    return preset_config("tiny", **{"num_days": 2, "rows_per_day": 3000, **over})


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# ------------------------------------------------------------------------------------------- config/API
@pytest.mark.parametrize(
    "over, name",
    [({"semantic_strength": 1.5}, "semantic_strength"), ({"target_ctr": 1.0}, "target_ctr"),
     ({"num_days": 0}, "num_days"), ({"rows_per_day": 1}, "rows_per_day"),
     ({"cardinality_scale": 0}, "cardinality_scale"),
     ({"noise_token_rate": -0.1}, "noise_token_rate"), ({"write_tsv": False, "write_npy": False}, "write_tsv")],
)  # fmt: skip
def test_config_validation_names_field_and_value(over: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SyntheticConfig(**over)


def test_presets() -> None:
    rows = {n: preset_config(n).total_rows for n in ("tiny", "small", "medium", "large")}
    assert 15_000 <= rows["tiny"] <= 25_000 and 1_000_000 <= rows["small"] <= 1_500_000
    assert 9e6 <= rows["medium"] <= 11e6 and 45e6 <= rows["large"] <= 55e6
    for n in ("tiny", "small", "medium", "large"):
        assert preset_config(f"{n}-control").semantic_strength == 0.0
        assert preset_config(n).semantic_strength == 1.0
    assert preset_config("tiny", seed=3).seed == 3
    with pytest.raises(ValueError, match="tiny-control"):
        get_preset("nope")
    assert set(PRESETS) >= {"tiny", "small", "medium", "large", "small-control"}


def test_token_of_golden_and_bijective() -> None:
    assert [int(t) for t in token_of("C1", np.array([0, 1, 2, 12345, 2**32 - 1]))] == [
        0x0, 0xC5357387, 0x8850E889, 0x3EEA5545, 0x28CE4E06]  # fmt: skip
    assert [int(t) for t in token_of(2, np.array([1, 12345]))] == [0x38E1A09C, 0xB705668B]  # field C3
    ids = np.arange(200_000)
    for f in ("C3", "C26"):
        assert np.unique(token_of(f, ids)).size == ids.size
    assert not np.intersect1d(token_of("C3", ids[1:]), token_of("C12", ids[1:])).size > 50
    assert token_of("C7", 0) == 0 and token_of("C7", np.array([5])).dtype == np.uint32


# ---------------------------------------------------------------------------------------- file behaviour
def test_determinism_seed_and_chunking(tmp_path: Path) -> None:
    generate(_mini(), tmp_path / "a")
    generate(_mini(chunk_rows=1000), tmp_path / "b")  # chunking is not part of the data
    generate(_mini(seed=1), tmp_path / "c")
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert sorted(a) == sorted(b) == sorted(c)
    for name in a:
        if name != "manifest.json":
            assert a[name] == b[name], name
    assert a["day_0"] != c["day_0"] and a["day_1_sparse.npy"] != c["day_1_sparse.npy"]


def test_idempotent_overwrite_and_interrupted(tmp_path: Path) -> None:
    out = tmp_path / "d"
    m1 = generate(_mini(), out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    t0 = time.perf_counter()
    assert generate(_mini(chunk_rows=5000), out) == m1  # identical data params: no-op
    assert time.perf_counter() - t0 < 0.5
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    with pytest.raises(FileExistsError, match="seed"):
        generate(_mini(seed=5), out)
    m2 = generate(_mini(seed=5, num_days=1), out, overwrite=True)
    assert m2["seed"] == 5 and not (out / "day_1").exists()
    (out / "manifest.json").unlink()  # an interrupted run leaves no manifest: regenerate
    assert generate(_mini(seed=5, num_days=1), out)["files"] == m2["files"]
    assert not list(out.glob("*.partial"))
    m3 = generate(_mini(write_tsv=False), tmp_path / "e")
    assert not (tmp_path / "e" / "day_0").exists() and "day_0_sparse.npy" in m3["files"]


# -------------------------------------------------------------------------------------------- manifest
def test_manifest_contents(tiny: Data) -> None:
    m = tiny.m
    assert m["format_version"] == 1 and m["params"] == preset_config("tiny").to_params()
    assert m["rows_per_day"] == [5000] * 4 and len(m["ctr_per_day"]) == 4
    card = np.array(m["num_embeddings_per_feature"])
    assert card.shape == (26,) and (tiny.S.max(axis=0) < card).all() and tiny.S.min() >= 0
    assert card[COL["C3"]] == card[COL["C12"]] == card[COL["C21"]] == card.max()
    for i in range(4):
        assert m["ctr_per_day"][i] == pytest.approx(tiny.labels[i].mean())
    o, half = m["oracle"], math.ceil(5000 / 2)
    assert o["val_rows"] == half and o["test_rows"] == 5000 - half
    assert o["val_auc"] == pytest.approx(auc(tiny.labels[3][:half], tiny.logits[3][:half]))
    assert o["test_auc"] == pytest.approx(auc(tiny.labels[3][half:], tiny.logits[3][half:]))
    assert 0.3 < o["val_logloss"] < 0.6 and 0.3 < o["test_logloss"] < 0.6
    g = m["field_groups"]
    assert g["near_duplicates"] == [["C3", "C12", "C21"]]
    assert ["C3", "C16", "C4", "C24"] in g["hierarchies"] and ["C7", "C13", "C8"] in g["hierarchies"]
    assert {"fields": ["C19", "C20", "C25", "C26"], "rate": 0.44} in g["missing_groups"]
    assert "id 0" in m["conventions"]["missing_categorical"]
    assert set(m["files"]) == {p.name for p in tiny.path.iterdir()} - {"manifest.json"}
    assert json.loads((tiny.path / "manifest.json").read_text()) == m


# ----------------------------------------------------------------------------------------- statistics
def test_heavy_tails(tiny: Data) -> None:
    x = tiny.col("C3")
    counts = np.sort(np.unique(x[x > 0], return_counts=True)[1])[::-1]
    head = counts[counts >= 2]
    slope = np.polyfit(np.log(np.arange(1, head.size + 1)), np.log(head), 1)[0]
    assert -1.3 < slope < -0.4, slope
    assert np.mean(counts <= 2) > 0.5 and np.mean(counts == 1) > 0.3


def test_new_ids_over_time(tiny: Data) -> None:
    c = COL["C3"]
    train = np.unique(np.concatenate([s[:, c] for s in tiny.sparse[:-1]]))
    ev = np.unique(tiny.sparse[-1][:, c])
    ev = ev[ev > 0]
    assert 1 - np.isin(ev, train).mean() > 0.1
    vocab = [np.unique(np.concatenate([s[:, c] for s in tiny.sparse[: d + 1]])).size for d in range(4)]
    assert all(b > a for a, b in zip(vocab, vocab[1:]))  # vocabulary keeps growing


def test_co_missing_groups_and_rates(tiny: Data) -> None:
    for fields, rate in CAT_MISSING_GROUPS:
        miss = tiny.S[:, [COL[f] for f in fields]] == 0
        assert (miss.all(axis=1) == miss.any(axis=1)).all(), fields  # missing together, always
        assert miss[:, 0].mean() == pytest.approx(rate, abs=0.02)
    never = [f for f in CAT_FIELDS if not any(f in g for g, _ in CAT_MISSING_GROUPS)]
    assert (tiny.S[:, [COL[f] for f in never]] > 0).all()


def _functional(finer: np.ndarray, coarser: np.ndarray) -> bool:
    pairs = np.unique(np.stack([finer, coarser], axis=1), axis=0)
    return np.unique(pairs[:, 0]).size == pairs.shape[0]


def test_near_duplicates_bijection(tiny: Data) -> None:
    a, b, c = (tiny.col(f) for f in ("C3", "C12", "C21"))
    ok = a > 0
    for x, y in ((a, b), (a, c), (b, c)):
        assert _functional(x[ok], y[ok]) and _functional(y[ok], x[ok])
    assert not (a[ok] == b[ok]).all()  # different salts


def test_hierarchies(tiny: Data) -> None:
    for finer, coarser in tiny.m["field_groups"]["functional_dependencies"]:
        f, g = tiny.col(finer), tiny.col(coarser)
        ok = (f > 0) & (g > 0)
        assert _functional(f[ok], g[ok]), (finer, coarser)
        assert np.unique(g[ok]).size < np.unique(f[ok]).size, (finer, coarser)


def test_dense_features(tiny: Data) -> None:
    raw, miss, y = [], [], []
    for i, day in enumerate(tiny.dense):  # invert log(x - m + 2)
        x = np.rint(np.exp(day.astype(np.float64)) + tiny.m["dense_min_per_day"][i] - 2).astype(np.int64)
        raw.append(x)
        y.append(tiny.labels[i][:, 0])
    x = np.concatenate(raw)
    lab = np.concatenate(y)
    assert x.min() >= -3 and (np.delete(x, 1, axis=1) >= 0).all() and (x[:, 1] < 0).any()
    assert np.median(x[:, 4]) > 100 and x[:, 4].max() > 20 * np.median(x[:, 4])  # I5: large, heavy tail
    for cols, rate in DENSE_MISSING_GROUPS:  # missing -> 0 (zeros also occur naturally: upper bound check)
        zero = (x[:, list(cols)] == 0).all(axis=1).mean()
        assert rate - 0.02 <= zero, (cols, rate, zero)
    assert (x[:, 1] == 0).mean() < 0.5
    aucs = [abs(auc(lab, x[:, j].astype(np.float64)) - 0.5) for j in range(13)]
    assert 0.02 < max(aucs) < 0.25  # weakly informative


def test_ctr_and_oracle(tiny: Data) -> None:
    assert tiny.Y.mean() == pytest.approx(0.256, abs=0.015)
    o = tiny.m["oracle"]
    assert 0.78 < o["val_auc"] < 0.90 and 0.78 < o["test_auc"] < 0.90
    assert 1.5 < tiny.Z.std() < 1.9
    assert tiny.Y.mean() == pytest.approx((1 / (1 + np.exp(-tiny.Z))).mean(), abs=0.015)


def _cluster_signal(d: Data) -> float:
    """Corr of a row's logit with the mean logit of *other* users of its user cluster (C24).

    Logits are first residualised on ad / publisher / context instances (who a cluster meets is shared
    at any semantic strength); only the user cluster's own label signal remains.
    """
    r = d.Z - d.Z.mean()
    for _ in range(5):
        for f in ("C10", "C7", "C26"):
            g = np.unique(d.col(f), return_inverse=True)[1]
            r = r - (np.bincount(g, r) / np.bincount(g))[g]
    ok = d.col("C24") > 0
    cl, r = d.col("C24")[ok], r[ok]
    inst = np.unique(d.col("C16")[ok], return_inverse=True)[1]  # C16 holds the user even on noise tokens
    num = np.bincount(cl, r)[cl] - np.bincount(inst, r)[inst]
    den = np.bincount(cl)[cl] - np.bincount(inst)[inst]
    g = den > 0
    return float(np.corrcoef(num[g] / den[g], r[g])[0, 1])


def _mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    ia, ib = (np.unique(v, return_inverse=True)[1] for v in (a, b))
    p = np.unique(ia * (ib.max() + 1) + ib, return_counts=True)[1] / a.size
    pa, pb = np.bincount(ia) / a.size, np.bincount(ib) / a.size
    return float(sum(-(q * np.log(q)).sum() for q in (pa, pb)) + (p * np.log(p)).sum())


def test_semantic_control(tiny: Data, tiny_control: Data) -> None:
    assert _cluster_signal(tiny) > 0.2
    assert abs(_cluster_signal(tiny_control)) < 0.15
    assert 0.78 < tiny_control.m["oracle"]["val_auc"] < 0.90
    rng = np.random.default_rng(0)
    for d in (tiny, tiny_control):  # co-occurrence structure exists in both: ad clusters follow user clusters
        ok = d.col("C24") > 0
        a, b = d.col("C24")[ok], d.col("C2")[ok]
        assert _mutual_info(a, b) > 3 * _mutual_info(a, rng.permutation(b))


# ------------------------------------------------------------------------------------------ TSV <-> npy
@pytest.mark.parametrize("day", [0, 3])
def test_tsv_matches_npy(tiny: Data, day: int) -> None:
    lines = (tiny.path / f"day_{day}").read_bytes().decode().split("\n")
    assert lines[-1] == "" and len(lines) - 1 == 5000
    m = tiny.m["dense_min_per_day"][day]
    for r in range(0, 5000, 25):
        cols = lines[r].split("\t")
        assert len(cols) == 40
        assert int(cols[0]) == tiny.labels[day][r, 0]
        ints = np.array([int(c or "0") for c in cols[1:14]], dtype=np.int64)  # missing -> 0, as TorchRec
        assert np.array_equal(np.log((ints - m + 2).astype(np.float32), dtype=np.float32), tiny.dense[day][r])
        for f, tok in enumerate(cols[14:]):
            cid = int(tiny.sparse[day][r, f])
            assert (tok == "") == (cid == 0)
            assert tok == ("" if cid == 0 else f"{int(token_of(f, cid)):08x}")
            assert int(tok or "0", 16) == int(token_of(f, cid))
    assert m == min(int(c or "0") for line in lines[:-1] for c in line.split("\t")[1:14])
