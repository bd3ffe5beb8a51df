"""``compactrec compare RUN_DIR ...``: side-by-side table of finished runs (from their metrics.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


def load_run(run_dir: Path) -> Dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `compactrec train` with training.run_dir={run_dir} first")
    return json.loads(path.read_text())


def compare_table(run_dirs: Sequence[Path]) -> str:
    """One line per run; the first run is the reference for the AUC difference."""
    runs = [(Path(d), load_run(Path(d))) for d in run_dirs]
    ref_auc = runs[0][1]["val"]["auc"]
    header = (f"{'run':<24} {'tables':<8} {'embedding bytes':>16} {'vs full':>9} {'val AUC':>8} {'dAUC':>8} "
              f"{'logloss':>8} {'test AUC':>8} {'oracle':>7} {'samples/s':>10}")
    lines: List[str] = [header, "-" * len(header)]
    for run_dir, m in runs:
        val, test = m["val"], m.get("test", {})
        lines.append(
            f"{run_dir.name:<24} {m['embeddings']:<8} {m['memory']['total_bytes']:>16,} "
            f"{_ratio(m['memory'].get('compression_ratio')):>9} {val['auc']:>8.4f} {val['auc'] - ref_auc:>+8.4f} "
            f"{val['logloss']:>8.4f} {test.get('auc', float('nan')):>8.4f} {val.get('oracle_auc', float('nan')):>7.4f} "
            f"{m['samples_per_s']:>10,.0f}"
        )
    return "\n".join(lines)


def _ratio(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1f}x"
