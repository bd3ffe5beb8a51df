"""The dataset manifest (``manifest.json`` beside generated data: table sizes, days, rows), read once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

MANIFEST = "manifest.json"


def read_manifest(path: Path) -> Optional[Dict[str, Any]]:
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from exc
