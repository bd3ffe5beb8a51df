"""TorchRec's Criteo Kaggle npy files (``npy_preproc_criteo --dataset_name criteo_kaggle``), written by TorchRec's
own script from a Kaggle-style ``train.txt``, read with ``data.kaggle_file=train``: the same splits, rows, labels
and ids as the raw ``train.txt`` read as TSV; and the error that points there when the config forgets it."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torchrec.datasets.scripts.npy_preproc_criteo import main as npy_preproc_criteo

from trainer.config import load_config
from trainer.data import loader
from trainer.data.data_config import DataConfig
from trainer.data.records import Batch, Chunk

DAYS = 4  # the tiny synthetic log's days, concatenated into one Kaggle-style train.txt


def _convert(tiny_dataset: Path, directory: Path) -> None:
    with open(directory / "train.txt", "wb") as out:
        for day in range(DAYS):
            out.write((tiny_dataset / f"day_{day}").read_bytes())
    npy_preproc_criteo(["--input_dir", str(directory), "--output_dir", str(directory),
                        "--dataset_name", "criteo_kaggle"])


@pytest.fixture(scope="module")
def kaggle_dir(tiny_dataset: Path) -> Iterator[Path]:
    # TorchRec's script writes labels -1 ("test set") for any input path containing "test", and pytest's
    # temporary directories all do: convert in a directory of another name
    with tempfile.TemporaryDirectory(prefix="kaggle-") as name:
        assert "test" not in name
        _convert(tiny_dataset, Path(name))
        yield Path(name)


def _config(directory: Path, fmt: str) -> DataConfig:
    return DataConfig(format=fmt, path=str(directory), kaggle_file="train.txt" if fmt == "tsv" else "train",
                      num_days=DAYS, train_days=[0, 1, 2], eval_day=3)


def _split(directory: Path, fmt: str, split: str) -> Batch:
    """The whole split as one batch (chunk boundaries differ between the readers)."""
    return Chunk.concat(list(loader.iter_split_chunks(_config(directory, fmt), split, 3000))).to_batch()


@pytest.mark.parametrize("split,rows", [("train", 15_000), ("val", 2_500), ("test", 2_500)])
def test_torchrec_kaggle_npy_reads_like_the_raw_train_txt(kaggle_dir: Path, split: str, rows: int) -> None:
    assert loader.count_rows(_config(kaggle_dir, "npy"), split) == rows
    from_tsv, from_npy = _split(kaggle_dir, "tsv", split), _split(kaggle_dir, "npy", split)
    assert from_npy.labels.numel() == rows
    assert torch.equal(from_tsv.labels, from_npy.labels)
    assert from_npy.dense_features.shape == from_tsv.dense_features.shape
    tsv_ids, npy_ids = from_tsv.sparse_features.to_dict(), from_npy.sparse_features.to_dict()
    for feature, jagged in tsv_ids.items():
        # TorchRec stores a missing categorical value as id 0; the TSV reader as an empty bag
        present = jagged.lengths().bool()
        assert torch.equal(npy_ids[feature].lengths(), torch.ones_like(present, dtype=torch.int32))
        assert torch.equal(npy_ids[feature].values()[present], jagged.values())
        assert torch.equal(npy_ids[feature].values()[~present], torch.zeros(int((~present).sum()), dtype=torch.int64))


def test_day_files_missing_beside_torchrec_kaggle_arrays_names_the_setting(kaggle_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"day_0_dense\.npy: no such file.*data\.kaggle_file=train"):
        loader.make_batches(DataConfig(format="npy", path=str(kaggle_dir)), "train", 0, 1)
    with pytest.raises(ValueError, match=r"kaggle_file='train_dense\.npy'.*stem"):
        DataConfig(format="npy", path=str(kaggle_dir), kaggle_file="train_dense.npy")


def test_labels_of_torchrecs_test_set_convention_are_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    """A path with "test" in it makes TorchRec's script write label -1 for every row: refused, not trained on."""
    _convert(tiny_dataset, tmp_path)
    with pytest.raises(ValueError, match=r"train_labels\.npy: row 0: label -1 is not 0 or 1"):
        next(loader.make_batches(_config(tmp_path, "npy"), "train", 0, 1))


def test_kaggle_npy_preset_states_the_protocol() -> None:
    config = load_config("configs/criteo_kaggle_npy.yaml")
    data = config.data
    assert (data.format, data.kaggle_file, data.num_days, data.train_days, data.eval_day) == (
        "npy", "train", 7, [0, 1, 2, 3, 4, 5], 6)
    assert config.embeddings.num_embeddings_per_feature == load_config(
        "configs/criteo_kaggle.yaml").embeddings.num_embeddings_per_feature
