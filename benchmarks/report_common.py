"""Reading result files of ``benchmarks/results/`` and their common header.

Every result file starts with the same header fields (``HEADER_FIELDS``): the commit the numbers were measured
on (or, for files older than the header, the commit that added the file), the date, the machine (processor and
L3 cache), the load while it ran and the command that wrote it. Where the header sits depends on the format:

- ``.json``: a top-level ``"header"`` object;
- ``.jsonl``: a first line ``{"header": {...}}`` (readers skip it, see ``read_jsonl``);
- ``.md``: a leading ``<!-- result header ... -->`` comment with one ``field: value`` line per field;
- ``.txt``: leading ``# field: value`` lines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

HEADER_FIELDS = ("commit", "date", "machine", "load", "command")
MACHINE_FIELDS = ("processor", "l3_cache")


def _text_header(lines: List[str]) -> Dict[str, Any]:
    header: Dict[str, Any] = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            header[key.strip()] = value.strip()
    machine = header.get("machine")
    if isinstance(machine, str):
        processor, _, l3 = machine.partition("; L3 cache ")
        header["machine"] = {"processor": processor, "l3_cache": l3}
    return header


def read_header(path: Path) -> Dict[str, Any]:
    """The header of one result file ({} when it has none)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text).get("header", {})
    if path.suffix == ".jsonl":
        first = json.loads(text.splitlines()[0]) if text.strip() else {}
        return first.get("header", {})
    lines = text.splitlines()
    if path.suffix == ".md":
        if not lines or lines[0] != "<!-- result header":
            return {}
        end = lines.index("-->")
        return _text_header(lines[1:end])
    head = []
    for line in lines:
        if not line.startswith("# "):
            break
        head.append(line[2:])
    return _text_header(head)


def missing_header_fields(path: Path) -> List[str]:
    """The header fields a result file lacks (empty list: complete)."""
    header = read_header(path)
    missing = [f for f in HEADER_FIELDS if not header.get(f)]
    machine = header.get("machine")
    if isinstance(machine, dict):
        missing += [f"machine.{f}" for f in MACHINE_FIELDS if not machine.get(f)]
    return missing


def read_json(path: Path) -> Dict[str, Any]:
    return json.loads(Path(path).read_text())


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """The records of a ``.jsonl`` result file, header line left out."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if "header" not in r]


def body(path: Path) -> str:
    """A ``.md`` / ``.txt`` result file without its header."""
    lines = Path(path).read_text().splitlines()
    if lines and lines[0] == "<!-- result header":
        lines = lines[lines.index("-->") + 1:]
    else:
        while lines and lines[0].startswith("# "):
            lines = lines[1:]
    return "\n".join(lines).strip("\n")


def result_header() -> Dict[str, Any]:
    """The common header for a result file written now: commit, date, machine (processor, L3), load, command."""
    import os
    import subprocess
    import sys
    import time

    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
        except OSError:
            return ""

    commit = run("git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "HEAD").strip()
    cpu = {line.split(":")[0].strip(): line.split(":", 1)[1].strip() for line in run("lscpu").splitlines()
           if ":" in line}
    return {"commit": commit or "not recorded", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"processor": cpu.get("Model name", "not recorded"),
                        "l3_cache": cpu.get("L3 cache", "not recorded"), "cpus": os.cpu_count()},
            "load": {"loadavg": list(os.getloadavg())},
            "command": " ".join(["python", *sys.argv])}
