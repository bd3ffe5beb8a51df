"""What a ``torch.save`` file that ``torch.load(weights_only=True)`` refused would have unpickled, read without
running it: the pickle's opcodes are listed (``pickletools.genops`` parses, it never calls or imports), so the
loader can say which objects the file carries and whether it is an artifact of an older format.
"""

from __future__ import annotations

import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Set

STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
INT_OPS = {"BININT", "BININT1", "BININT2", "INT", "LONG1", "LONG4", "LONG"}
MAX_PICKLE_BYTES = 64 << 20  # the object tree only; tensors are separate members of the archive


@dataclass
class PickleScan:
    """The globals (``module.name``) the pickle would import or call beyond those ``torch.load(weights_only=True)``
    allows (tensor storages, ``OrderedDict``, ...), and the ``format`` / ``version`` entries it holds (the first of
    each), when they could be read."""

    globals: List[str] = field(default_factory=list)
    format: Optional[str] = None
    version: Optional[int] = None


def _allowed() -> Set[str]:
    """The globals torch's weights-only unpickler accepts (private API: an empty set where it is missing)."""
    try:
        from torch import _weights_only_unpickler

        return set(_weights_only_unpickler._get_allowed_globals())
    except (ImportError, AttributeError):
        return set()


def _pickle_bytes(path: Path) -> Optional[bytes]:
    """The object pickle of a ``torch.save`` zip archive (``<name>/data.pkl``), else None."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names or archive.getinfo(names[0]).file_size > MAX_PICKLE_BYTES:
                return None
            return archive.read(names[0])
    except (zipfile.BadZipFile, OSError, KeyError, ValueError):
        return None


def scan(path: Path) -> PickleScan:
    """The :class:`PickleScan` of the file at ``path`` (empty when it is no readable ``torch.save`` archive)."""
    out = PickleScan()
    data = _pickle_bytes(path)
    if data is None:
        return out
    strings: List[str] = []  # the strings pushed so far, for STACK_GLOBAL and the format / version entries
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                out.globals.append(str(arg).replace(" ", "."))
            elif name == "STACK_GLOBAL" and len(strings) >= 2:
                out.globals.append(f"{strings[-2]}.{strings[-1]}")
            if name in STRING_OPS:
                text = arg.decode("latin-1") if isinstance(arg, bytes) else str(arg)
                if strings and strings[-1] == "format" and out.format is None:
                    out.format = text
                strings.append(text)
            elif (name in INT_OPS and isinstance(arg, int) and strings and strings[-1] == "version"
                  and out.version is None):
                out.version = arg
    except (ValueError, TypeError, EOFError):
        pass  # a damaged pickle: what was read so far
    allowed = _allowed()
    out.globals = [g for g in out.globals if g not in allowed]
    return out


__all__ = ["PickleScan", "scan"]
