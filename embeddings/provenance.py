"""Comparing what an artifact of ``compactrec prepare`` records (the options that shaped it, the fingerprint of the
data it was built from) with what a config expects: pure dictionaries, so a method's own artifact hooks
(``embeddings.types.ArtifactHooks``) use it without the trainer. The fingerprint itself is the trainer's
(``trainer.prepare.fingerprint.data_fingerprint``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence


class ArtifactMismatch(ValueError):
    """An artifact was built from other data or with other options than the config asks for."""


def differences(recorded: Mapping[str, Any], expected: Mapping[str, Any], prefix: str = "") -> List[str]:
    """Human-readable list of the fields where ``recorded`` differs from ``expected`` (nested mappings are
    compared field by field; a field present in only one of them counts)."""
    out: List[str] = []
    for key in sorted(set(recorded) | set(expected)):
        name = f"{prefix}{key}"
        if key not in recorded:
            out.append(f"{name}: not recorded (expected {expected[key]!r})")
        elif key not in expected:
            out.append(f"{name}: recorded {recorded[key]!r}, not expected")
        elif isinstance(recorded[key], Mapping) and isinstance(expected[key], Mapping):
            out += differences(recorded[key], expected[key], prefix=f"{name}.")
        elif recorded[key] != expected[key]:
            out.append(f"{name}: built with {_short(recorded[key])}, config gives {_short(expected[key])}")
    return out


def _short(value: Any, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_provenance(artifact: str | Path, recorded: Mapping[str, Any], expected: Mapping[str, Any],
                     rebuild_command: str, what: Optional[str] = None) -> None:
    """Raise :class:`ArtifactMismatch` naming the artifact, each differing field and ``rebuild_command``."""
    diffs = differences(recorded, expected)
    if diffs:
        listed = "; ".join(diffs[:8]) + (f"; ... ({len(diffs) - 8} more)" if len(diffs) > 8 else "")
        raise ArtifactMismatch(f"{what or 'artifact'} {artifact} does not match the config: {listed}. "
                               f"Rebuild it: {rebuild_command}")


__all__: Sequence[str] = ["ArtifactMismatch", "check_provenance", "differences"]
