"""Fixtures of the reader fuzz tests: the clean dataset once per module, a private copy per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.data.common import write_dataset


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
