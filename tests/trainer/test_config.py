"""Strict config loading: every mistake names the key, the value and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainer.config import Config, load_config, parse_override, save_config
from trainer.strict import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_preset_loads() -> None:
    presets = sorted((REPO / "configs").glob("*.yaml"))
    assert presets, "no presets in configs/"
    for preset in presets:
        assert isinstance(load_config(preset), Config), preset


def test_unknown_key_names_key_value_and_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "training:\n  epochz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "unknown key 'training.epochz'" in msg
    assert "3" in msg and str(path) in msg and "valid keys" in msg


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'trainer'"):
        load_config(_write(tmp_path, "trainer:\n  epochs: 1\n"))


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    path = _write(tmp_path, "data:\n  batch_size: large\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "data.batch_size" in str(err.value) and "'large'" in str(err.value) and str(path) in str(err.value)


def test_bool_is_not_an_int_and_int_is_not_a_bool(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="training.epochs"):
        load_config(_write(tmp_path, "training:\n  epochs: true\n"))
    with pytest.raises(ConfigError, match="training.progress_bar"):
        load_config(_write(tmp_path, "training:\n  progress_bar: 1\n"))


def test_list_items_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.dense_arch_layer_sizes\[1\]"):
        load_config(_write(tmp_path, "model:\n  dense_arch_layer_sizes: [64, x, 16]\n"))


def test_impossible_values(tmp_path: Path) -> None:
    cases = {
        "model:\n  embedding_dim: 16\n  dense_arch_layer_sizes: [64, 32]\n": "must end with embedding_dim",
        "model:\n  over_arch_layer_sizes: [64, 2]\n": "must end with 1",
        "optimizer:\n  sparse: adam\n": "sparse must be one of",
        "optimizer:\n  sparse_lr: -1.0\n": "sparse_lr must be positive",
        "data:\n  batch_size: 0\n": "batch_size",
        "training:\n  device: tpu\n": "device must be",
        "sharding:\n  tables:\n    t_cat_0:\n      sharding_types: [diagonal]\n": "diagonal",
    }
    for text, needle in cases.items():
        path = _write(tmp_path, text)
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert needle in str(err.value) and str(path) in str(err.value), (text, str(err.value))


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_base_chain_and_overrides(tmp_path: Path) -> None:
    _write(tmp_path, "training:\n  epochs: 3\n  seed: 5\noptimizer:\n  sparse_lr: 0.5\n", "base.yaml")
    child = _write(tmp_path, "base: base.yaml\ntraining:\n  seed: 7\n", "child.yaml")
    cfg = load_config(child, ["optimizer.sparse_lr=0.25", "embeddings.options={pooling: mean}"])
    assert (cfg.training.epochs, cfg.training.seed, cfg.optimizer.sparse_lr) == (3, 7, 0.25)
    assert cfg.embeddings.options == {"pooling": "mean"}


def test_base_loop_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path, "base: b.yaml\n", "a.yaml")
    _write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_override_errors() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("epochs")
    with pytest.raises(ConfigError, match="section.key"):
        parse_override("epochs=3")
    with pytest.raises(ConfigError, match="training.epochs"):
        load_config(None, ["training.epochs=three"])
    with pytest.raises(ConfigError, match="unknown key 'training.epoch'"):
        load_config(None, ["training.epoch=3"])


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["training.seed=11", "sharding.default_sharding_types=[row_wise]"])
    save_config(cfg, tmp_path / "resolved.yaml")
    data = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert data["training"]["seed"] == 11 and "data" in data and "launch" in data
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


def test_method_options_are_strict() -> None:
    import torch

    from trainer.train.model import build_sparse_arch, sparse_context

    # checked when the config loads (naming its source), and again when the module is built
    with pytest.raises(ConfigError, match="<defaults> .*poolng"):
        load_config(None, ["embeddings.options={poolng: sum}"])
    with pytest.raises(ConfigError, match="<defaults> .*registered kinds: .*full"):
        load_config(None, ["embeddings.kind=nonexistent"])
    cfg = load_config(None)
    cfg.embeddings.options = {"poolng": "sum"}
    ctx = sparse_context(cfg, ["a"], [10], torch.device("meta"))
    with pytest.raises(ConfigError, match="poolng"):
        build_sparse_arch(cfg, ctx)


def test_config_reference_doc_is_current() -> None:
    from trainer.commands.config_doc import render

    assert (REPO / "docs" / "CONFIG.md").read_text() == render(), "run: python -m trainer.commands.config_doc > docs/CONFIG.md"


def test_embedding_options_doc_is_current() -> None:
    from trainer.commands.embeddings_doc import render

    assert (REPO / "docs" / "EMBEDDINGS.md").read_text() == render(), "run: python -m trainer.commands.embeddings_doc > docs/EMBEDDINGS.md"


def test_exponent_floats_without_a_dot_are_numbers(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) alone reads 1e-3 as the string '1e-3'
    cfg = load_config(_write(tmp_path, "optimizer:\n  dense_lr: 1e-3\n  sparse_lr: 5E-2\n"), ["optimizer.eps=1e-8"])
    assert (cfg.optimizer.dense_lr, cfg.optimizer.sparse_lr) == (0.001, 0.05)
