"""MLPerf-style structured events (``:::MLLOG {json}`` lines), kept apart from the human progress output.

Rank 0 appends them to ``RUN_DIR/mlperf.log``, through the run's ``Reporter`` (``trainer/train/reporting.py``),
which owns the logger. Keys follow the MLPerf logging conventions used by the recommendation (DLRMv2)
benchmark: run_start/run_stop, eval_start/eval_stop, eval_accuracy with the epoch fraction in
``metadata.epoch_num``, train_samples/eval_samples, global_batch_size, opt_base_learning_rate.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Optional, TextIO


class MLPerfLogger:
    """Writes one JSON event per line; a no-op on ranks other than 0."""

    def __init__(self, path: Optional[Path], benchmark: str = "dlrm_dcnv2") -> None:
        self._file: Optional[TextIO] = None
        self.benchmark = benchmark
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", buffering=1)

    def event(self, key: str, value: Any = None, metadata: Optional[Dict[str, Any]] = None,
              event_type: str = "POINT_IN_TIME") -> None:
        if self._file is None:
            return
        record = {
            "namespace": "",
            "time_ms": int(time.time() * 1000),
            "event_type": event_type,
            "key": key,
            "value": value,
            "metadata": dict(metadata or {}),
        }
        self._file.write(":::MLLOG " + json.dumps(record, sort_keys=True) + "\n")

    def start(self, key: str, value: Any = None, metadata: Optional[Dict[str, Any]] = None) -> None:
        self.event(key, value, metadata, event_type="INTERVAL_START")

    def end(self, key: str, value: Any = None, metadata: Optional[Dict[str, Any]] = None) -> None:
        self.event(key, value, metadata, event_type="INTERVAL_END")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_events(path: Path) -> list[Dict[str, Any]]:
    """Parse a ``mlperf.log`` back into event dicts (tests, tooling)."""
    events = []
    for line in Path(path).read_text().splitlines():
        if line.startswith(":::MLLOG "):
            events.append(json.loads(line[len(":::MLLOG "):]))
    return events
