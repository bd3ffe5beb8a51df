"""The results pages (docs/results/*.md) against benchmarks/results/: (a) every generated table equals what
``benchmarks/pages_report.py`` renders from its result file now, (b) every result file is cited by a docs page,
(c) every result file carries the same header fields (commit, date, machine with processor and L3 cache, load,
command)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, List

import pytest

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"


def _module(name: str) -> Any:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def _result_files() -> List[Path]:
    return sorted(p for p in RESULTS.iterdir() if p.is_file())


def test_pages_exist_and_have_tables() -> None:
    pages = _module("pages_report").pages()
    names = {p.name for p in pages}
    assert {"README.md", "quality.md", "training_speed.md", "inference.md"} <= names
    assert all(_module("pages_report").cited_files(p.read_text()) for p in pages if p.name != "README.md")


@pytest.mark.parametrize("page", ["quality.md", "training_speed.md", "inference.md"])
def test_generated_tables_are_current(page: str) -> None:
    pages_report = _module("pages_report")
    path = REPO / "docs" / "results" / page
    text = path.read_text()
    assert text == pages_report.regenerate(text), (
        f"docs/results/{page} is out of date with benchmarks/results/: run "
        f"`{pages_report.REGENERATE}` and commit the page")


def test_every_result_file_is_cited_by_a_page() -> None:
    docs = "\n".join(p.read_text() for p in (REPO / "docs").rglob("*.md"))
    uncited = [p.name for p in _result_files() if f"benchmarks/results/{p.name}" not in docs]
    assert not uncited, f"result files no docs page cites (cite them or delete them): {uncited}"


def test_every_cited_result_file_exists() -> None:
    pages_report = _module("pages_report")
    missing = [f"{page.name}: {ref}" for page in pages_report.pages()
               for ref in pages_report.cited_files(page.read_text()) if not (REPO / ref).is_file()]
    assert not missing, missing


@pytest.mark.parametrize("name", [p.name for p in _result_files()])
def test_result_file_header(name: str) -> None:
    report_common = _module("report_common")
    path = RESULTS / name
    assert not report_common.missing_header_fields(path), (
        f"{name}: header lacks {report_common.missing_header_fields(path)} (fields: {report_common.HEADER_FIELDS})")
    commit = str(report_common.read_header(path)["commit"])
    assert len(commit) == 40 and all(c in "0123456789abcdef" for c in commit), commit
