"""Fuzzing the config loader: valid presets (configs/default.yaml, memrec_small.yaml, lma_small.yaml) mutated
systematically; every mutation must raise a ``ConfigError`` naming the key and the file, or (for a YAML edit
that changes nothing, e.g. inside a comment) load to exactly the original config. Never a silent change.

Covered: an unknown key at every level (and a one-letter typo of every key the preset sets), a wrong type
for every field of every section (and of the methods' options), out-of-range values, NaN / infinity, line
edits of the YAML (indentation, lost colon, tab, duplicated or dedented line), empty and non-mapping files,
``base:`` chains (missing, empty, looping, broken base), bad ``section.key=value`` overrides and unknown or
missing feature names. ``test_config.py`` holds the first example of most of these; this module sweeps them.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import torch
import yaml

from embeddings import registry
from trainer.config import Config, load_config, read_yaml
from trainer.strict import ConfigError, from_dict

REPO = Path(__file__).resolve().parents[2]
PRESETS = [REPO / "configs" / name for name in ("default.yaml", "memrec_small.yaml", "lma_small.yaml")]
SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
HINTS = typing.get_type_hints(Config)


def child(tmp_path: Path, base: Path, data: Dict[str, Any], name: str = "child.yaml") -> Path:
    """A preset that starts from ``base`` and sets ``data``."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"base": str(base), **data}, sort_keys=False))
    return path


def raises(path: Path, *needles: str, overrides: Tuple[str, ...] = ()) -> str:
    """Load ``path``; it must raise a ConfigError naming the file and every needle. Returns the message."""
    with pytest.raises(ConfigError) as err:
        load_config(path, list(overrides))
    message = str(err.value)
    assert str(path) in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def section_fields(section: str) -> Iterator[Tuple[str, Any]]:
    cls = HINTS[section]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield f.name, hints[f.name]


def wrong_values(tp: Any) -> List[Any]:
    """Values of a wrong type for a field of type ``tp`` (None only where the field is not Optional)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return [v for v in wrong_values(inner) if v is not None]
    if tp is typing.Any:
        return []
    if origin is list:
        (item,) = args
        return [5, "a", {"a": 1}, None] + [[v] for v in wrong_values(item) if v is not None][:2]
    if origin is dict:
        return [[1], "a", 5, None]
    if dataclasses.is_dataclass(tp):
        return [5, "a", [1], None]
    return {
        int: ["x", 1.5, True, [1], {"a": 1}, None],
        float: ["x", True, [1.0], {"a": 1.0}, None],
        bool: [1, "true", [True], None],
        str: [1, 1.5, True, ["a"], {"a": "b"}, None],
    }[tp]


# ------------------------------------------------------------------------------------------ unknown keys

@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_unknown_key_at_every_level(preset: Path, tmp_path: Path) -> None:
    resolved = read_yaml(preset)
    raises(child(tmp_path, preset, {"zz_unknown": 1}), "unknown key 'zz_unknown'", "valid keys")
    for section in SECTIONS:
        raises(child(tmp_path, preset, {section: {"zz_unknown": 1}}), f"unknown key '{section}.zz_unknown'",
               f"valid keys of {section}", str(preset))
    raises(child(tmp_path, preset, {"sharding": {"tables": {"t_cat_0": {"sharding_type": ["row_wise"]}}}}),
           "unknown key 'sharding.tables.t_cat_0.sharding_type'")
    # a one-letter typo of every key the preset (with its base) sets, each in a file of its own
    path = tmp_path / "typo.yaml"
    for section, values in resolved.items():
        raises(_dump(path, {**resolved, section + "s": values}), f"unknown key '{section}s'")
        for key in values:
            typo = key[:-1] + ("x" if key[-1] != "x" else "y")
            mutated = {**resolved, section: {**{k: v for k, v in values.items() if k != key}, typo: values[key]}}
            raises(_dump(path, mutated), f"unknown key '{section}.{typo}'")


def _dump(path: Path, data: Dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("preset", PRESETS[1:], ids=lambda p: p.name)
def test_method_options_unknown_keys_and_wrong_types(preset: Path) -> None:
    """``embeddings.options`` is checked against the method's options dataclass when the model is built."""
    config = load_config(preset)
    options = config.embeddings.options
    options_type = registry.get(config.embeddings.kind).options_type
    from_dict(options_type, options, source=str(preset), prefix="embeddings.options")  # valid as given
    for key in list(options) + ["zz_unknown"]:
        typo = key + "s"
        with pytest.raises(ConfigError, match=f"unknown key 'embeddings.options.{typo}'"):
            from_dict(options_type, {**options, typo: 1}, source=str(preset), prefix="embeddings.options")
    hints = typing.get_type_hints(options_type)
    for f in dataclasses.fields(options_type):
        for value in wrong_values(hints[f.name]):
            with pytest.raises(ConfigError) as err:
                from_dict(options_type, {**options, f.name: value}, source=str(preset), prefix="embeddings.options")
            assert f"embeddings.options.{f.name}" in str(err.value) and str(preset) in str(err.value), (f.name, value)


# ------------------------------------------------------------------------------------------- wrong types

def test_wrong_type_for_every_field_of_every_section(tmp_path: Path) -> None:
    checked = 0
    for section in SECTIONS:
        raises(child(tmp_path, PRESETS[0], {section: [1]}), f"{section}: expected a mapping (section)")
        raises(child(tmp_path, PRESETS[0], {section: None}), f"{section}: expected a mapping (section)")
        for name, tp in section_fields(section):
            for value in wrong_values(tp):
                message = raises(child(tmp_path, PRESETS[0], {section: {name: value}}), f"{section}.{name}")
                assert "expected" in message, message
                checked += 1
    assert checked > 150


def test_non_finite_numbers_for_every_float_field(tmp_path: Path) -> None:
    """YAML .nan / .inf pass ``x <= 0`` style checks; a learning rate of NaN would train to NaN silently."""
    floats = [(s, n) for s in SECTIONS for n, tp in section_fields(s)
              if float in (tp, *typing.get_args(tp))]
    assert ("optimizer", "sparse_lr") in floats and ("sharding", "reserved_memory_fraction") in floats
    path = tmp_path / "c.yaml"
    for section, name in floats:
        for text in (".nan", ".NaN", ".inf", "-.inf", "1" + "0" * 400):
            path.write_text(f"{section}:\n  {name}: {text}\n")
            raises(path, f"{section}.{name}: expected a finite number")


# ------------------------------------------------------------------------------------------ out of range

OUT_OF_RANGE = [
    ("data", "format", "parquet"), ("data", "path", ""), ("data", "train_days", []), ("data", "train_days", [0, 0]),
    ("data", "train_days", [-1]), ("data", "eval_day", -1), ("data", "eval_day", 0), ("data", "kaggle_file", "t.txt"),
    ("data", "tsv_has_label", False), ("data", "batch_size", 0), ("data", "eval_batch_size", -5),
    ("data", "bad_rows", "ignore"), ("data", "limit_train_batches", -1), ("data", "limit_eval_batches", -1),
    ("data", "multi_hot_sizes", [1] * 25), ("data", "multi_hot_sizes", [0] * 26),
    ("data", "multi_hot_distribution", "zipf"), ("data", "multi_hot_min_table_size", -1),
    ("data", "multi_hot_seed", -1), ("data", "multi_hot_seed", 2**32), ("data", "num_embeddings_per_feature", [0] * 26),
    ("model", "arch", "dlrm2"), ("model", "embedding_dim", 0), ("model", "dense_arch_layer_sizes", [64, 8]),
    ("model", "dense_arch_layer_sizes", []), ("model", "dense_arch_layer_sizes", [-1, 16]),
    ("model", "over_arch_layer_sizes", [64, 2]), ("model", "over_arch_layer_sizes", []),
    ("model", "over_arch_layer_sizes", [0, 1]), ("model", "dcn_num_layers", 0), ("model", "dcn_low_rank_dim", -1),
    ("embeddings", "num_embeddings_per_feature", [0] * 26),
    ("sharding", "default_sharding_types", ["diagonal"]), ("sharding", "reserved_memory_fraction", 1.0),
    ("sharding", "reserved_memory_fraction", -0.1), ("sharding", "device_memory_gb", 0),
    ("sharding", "host_memory_gb", -1),
    ("optimizer", "sparse", "adam"), ("optimizer", "dense", "lamb"), ("optimizer", "sparse_lr", 0),
    ("optimizer", "dense_lr", -1e-3), ("optimizer", "eps", 0.0), ("optimizer", "weight_decay", -1),
    ("optimizer", "reference_global_batch", 0),
    ("training", "epochs", 0), ("training", "log_every", 0), ("training", "device", "tpu"),
    ("training", "target_auc", 1.5), ("launch", "nnodes", 0),
]  # fmt: skip


@pytest.mark.parametrize("preset", [PRESETS[0], PRESETS[1]], ids=lambda p: p.name)
def test_out_of_range_values_name_section_key_and_file(preset: Path, tmp_path: Path) -> None:
    for section, name, value in OUT_OF_RANGE:
        message = raises(child(tmp_path, preset, {section: {name: value}}), section, name, str(preset))
        assert "unknown key" not in message, message
    raises(child(tmp_path, preset, {"sharding": {"tables": {"t_cat_0": {"compute_kernels": ["quantum"]}}}}),
           "sharding.tables.t_cat_0", "quantum")
    raises(child(tmp_path, preset, {"data": {"num_embeddings_per_feature": [5] * 26},
                                    "embeddings": {"num_embeddings_per_feature": [6] * 26, "table_sizes": "auto"}}),
           "data.num_embeddings_per_feature differs from embeddings.num_embeddings_per_feature")


# ------------------------------------------------------------------------------------- malformed YAML

def line_edits(line: str) -> Iterator[Tuple[str, str]]:
    yield "indent+1", " " + line
    if ":" in line:
        yield "no colon", line.replace(":", " ", 1)
    yield "duplicated", line + line
    if line.startswith(" "):
        yield "tab", "\t" + line.lstrip(" ")
        yield "dedented", line.lstrip(" ")


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_line_edits_are_errors_or_change_nothing(preset: Path, tmp_path: Path) -> None:
    """Every structural edit of every setting line: a ConfigError naming the file (a duplicated key and a
    dedented key are named too), or exactly the original config (e.g. re-indenting a section's only key)."""
    original = load_config(preset)
    (tmp_path / "default.yaml").write_text((REPO / "configs" / "default.yaml").read_text())  # the base
    lines = preset.read_text().splitlines(keepends=True)
    path = tmp_path / preset.name
    unchanged = 0
    for i, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key = line.strip().split(":", 1)[0]
        for what, edited in line_edits(line):
            path.write_text("".join(lines[:i]) + edited + "".join(lines[i + 1:]))
            try:
                config = load_config(path)
            except ConfigError as exc:
                message = str(exc)
                assert str(path) in message, (i, what, message)
                if what == "duplicated":
                    assert f"found key {key!r} twice" in message, message
                elif "not valid YAML" in message:
                    assert "line " in message, message  # where the parser noticed (comments may follow)
                elif what == "dedented":
                    assert f"unknown key '{key}'" in message, message
                continue
            assert config == original, (i + 1, what, line)
            unchanged += 1
    assert unchanged <= 2  # only the re-indented key of a one-key section


@pytest.mark.parametrize("text,needle", [
    ("data: [unclosed\n", "not valid YAML"), ("data:\n  format: 'npy\n", "not valid YAML"),
    ("data:\n  format npy\n  path: x\n", "not valid YAML"), ("data: {format: npy\n", "not valid YAML"),
    ("data:\n  format: npy\n - x\n", "not valid YAML"), ("data:\n  format: npy: npz\n", "not valid YAML"),
    ("data:\n  format: *nope\n", "not valid YAML"), ("data:\n  format: npy\n---\ndata: {}\n", "not valid YAML"),
    ("data:\n  format: npy\n\x00\n", "not valid YAML"), ("training:\n  epochs: 1\n  epochs: 2\n", "'epochs' twice"),
    ("training: {epochs: 1}\ntraining: {seed: 2}\n", "'training' twice"),
    ("sharding:\n  tables:\n    t_cat_0: {}\n    t_cat_0: {}\n", "'t_cat_0' twice"),
    ("training:\n  epochs: 1" + "0" * 5000 + "\n", "not valid YAML"),
    ("", "empty"), ("\n\n", "empty"), ("# all settings commented out\n# data:\n", "empty"), ("---\n", "empty"),
    ("null\n", "empty"), ("~\n", "empty"), ("5\n", "top level must be a mapping"),
    ("'data'\n", "top level must be a mapping"), ("[data]\n", "top level must be a mapping"),
    ("data: 5\n", "data: expected a mapping (section)"), ("data:\n", "data: expected a mapping (section)"),
    ("data:\n  batch_size:\n", "data.batch_size: expected an integer, got None"),
])  # fmt: skip
def test_malformed_or_empty_files(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    raises(path, needle)


def test_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"data:\n  path: caf\xe9\n")  # latin-1
    raises(path, "not valid YAML", "utf-8")


# ------------------------------------------------------------------------------------------ base chains

def test_base_chains(tmp_path: Path) -> None:
    missing = tmp_path / "a.yaml"
    missing.write_text("base: nope.yaml\n")
    raises(missing, "base 'nope.yaml'", str(tmp_path / "nope.yaml"), "does not exist")
    for value in ("", "null", "[default.yaml]", "3", "{a: b}"):
        missing.write_text(f"base: {value}\n")
        raises(missing, "base must be a file name")
    missing.write_text("base: .\n")  # a directory, not a file
    raises(missing, "base '.'", "does not exist")
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    raises(tmp_path / "self.yaml", "loops back")
    for a, b in (("x", "y"), ("y", "z"), ("z", "x")):
        (tmp_path / f"{a}.yaml").write_text(f"base: {b}.yaml\ntraining:\n  seed: 1\n")
    raises(tmp_path / "x.yaml", "loops back")
    # a broken base: the error names the base file; a bad key in the base names both files
    top = tmp_path / "top.yaml"
    top.write_text("base: b.yaml\ntraining:\n  seed: 3\n")
    for text, needle in (("", "empty"), ("data: [\n", "not valid YAML"), ("- 1\n", "top level must be a mapping"),
                         ("training:\n  seed: 1\n  seed: 2\n", "twice")):
        (tmp_path / "b.yaml").write_text(text)
        with pytest.raises(ConfigError, match=needle) as err:
            load_config(top)
        assert str(tmp_path / "b.yaml") in str(err.value)
    (tmp_path / "b.yaml").write_text("training:\n  epochz: 2\n")
    raises(top, "unknown key 'training.epochz'", str(tmp_path / "b.yaml"))
    (tmp_path / "b.yaml").write_text("training:\n  epochs: 2\n")
    assert (load_config(top).training.epochs, load_config(top).training.seed) == (2, 3)  # the valid chain


# ------------------------------------------------------------------------------------------- overrides

OVERRIDES = [
    ("data.batch_size", "must look like section.key=value"), ("=3", "key must be section.key"),
    ("data=3", "key must be section.key"), (".batch_size=3", "key must be section.key"),
    ("nosuch.key=1", "unknown key 'nosuch'"), ("data.nosuch=1", "unknown key 'data.nosuch'"),
    ("data.batch_size=x", "data.batch_size: expected an integer"), ("data.batch_size=[1", "not valid YAML"),
    ("data.batch_size=1.5", "data.batch_size: expected an integer"),
    ("data.batch_size=.nan", "data.batch_size: expected an integer"),
    ("data.batch_size=", "data.batch_size: expected an integer, got ''"),
    ("data.batch_size.sub=1", "data.batch_size: expected an integer"),
    ("data.train_days=3", "data.train_days: expected a list"), ("data.train_days=[a]", "data.train_days[0]"),
    ("data.format=", "data.format=''"), ("optimizer.sparse_lr=.inf", "optimizer.sparse_lr: expected a finite"),
    ("optimizer.sparse_lr=1e-3x", "optimizer.sparse_lr: expected a number, got '1e-3x'"),
    ("sharding.tables={t_cat_0: {sharding_types: [x]}}", "sharding.tables.t_cat_0"),
    ("sharding.tables={a: {}, a: {}}", "found key 'a' twice"), ("embeddings.options=[1]", "embeddings.options"),
    ("training.epochs=0", "epochs must be positive"), ("data={batch_size: 1}", "key must be section.key"),
]  # fmt: skip


@pytest.mark.parametrize("override,needle", OVERRIDES)
def test_bad_overrides_name_the_key(override: str, needle: str) -> None:
    for preset in (None, PRESETS[1]):
        with pytest.raises(ConfigError) as err:
            load_config(preset, ["training.seed=1", override])
        message = str(err.value)
        assert needle in message, message
        if preset is not None and "section.key" not in needle and "YAML" not in needle and "twice" not in needle:
            assert str(preset) in message and override in message, message


# ------------------------------------------------------------------------------------ feature names

@pytest.mark.parametrize("groups,needle", [
    ("[[cat_0, cat_99]]", "unknown feature 'cat_99'"), ("[[cat_0, int_0]]", "unknown feature 'int_0'"),
    ("[[cat_0]]", "are in no group"), ("[[cat_0, cat_1], [cat_1]]", "feature 'cat_1' is in groups 0 and 1"),
    ("[]", "must be null or a list of non-empty lists"), ("[[]]", "must be null or a list of non-empty lists"),
])  # fmt: skip
def test_unknown_or_missing_feature_names_in_method_options(groups: str, needle: str) -> None:
    from trainer.data.records import SPARSE_FEATURES
    from trainer.train.model import build_sparse_arch, sparse_context

    config = load_config(REPO / "configs" / "robe_small.yaml", [f"embeddings.options.feature_groups={groups}"])
    ctx = sparse_context(config, SPARSE_FEATURES, [1000] * 26, torch.device("meta"))
    with pytest.raises(ValueError, match="embeddings.options.feature_groups") as err:
        build_sparse_arch(config, ctx)
    assert needle in str(err.value)


def test_table_sizes_for_a_wrong_number_of_features() -> None:
    from trainer.prepare.dataset_info import dataset_info

    for sizes in ([10] * 25, [10] * 27):
        config = load_config(None, [f"embeddings.num_embeddings_per_feature={sizes}", "data.path=/nonexistent"])
        with pytest.raises(ValueError, match="embeddings.num_embeddings_per_feature must list 26 table sizes"):
            dataset_info(config, require_data=False)


def test_manifest_table_sizes_must_be_positive_integers(tmp_path: Path) -> None:
    import json

    from trainer.config import load_config as load
    from trainer.prepare.dataset_info import dataset_info

    sizes = [10] * 26
    for bad, shown in ((1.5, "1.5"), ("7", "'7'"), (0, "0"), (True, "True")):
        sizes[3] = bad
        (tmp_path / "manifest.json").write_text(json.dumps({"num_embeddings_per_feature": sizes}))
        config = load(None, [f"data.path={tmp_path}"])
        with pytest.raises(ValueError, match=r"manifest.json: num_embeddings_per_feature\[3\] \(cat_3\) "
                                             f"must be a positive integer, got {shown}$"):
            dataset_info(config, require_data=False)
    (tmp_path / "manifest.json").write_text(json.dumps({"num_embeddings_per_feature": [10] * 25}))
    with pytest.raises(ValueError, match="must list 26 table sizes"):
        dataset_info(load(None, [f"data.path={tmp_path}"]), require_data=False)


def test_embedding_kind_and_options_are_checked_at_load_naming_the_file() -> None:
    from trainer.config import load_config as load

    with pytest.raises(ConfigError, match=r"memrec_small.yaml.*embeddings.kind: unknown embeddings.kind 'nope'"):
        load(REPO / "configs" / "memrec_small.yaml", ["embeddings.kind=nope"])
    with pytest.raises(ConfigError, match=r"lma_small.yaml.*unknown key 'embeddings.options.bogus'"):
        load(REPO / "configs" / "lma_small.yaml", ["embeddings.options.bogus=1"])
