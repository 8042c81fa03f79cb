"""Which LoRA adapter serves: the registry's pointer file, read cheaply before each request.

The trainer's registry (``trainer/registry.py``) keeps adapters in ``<adapters_dir>/<version>/``
and names the active one in ``<adapters_dir>/ACTIVE`` (replaced atomically). The runtime asks an
``ActiveAdapter`` before each request; it re-reads the pointer only when the file changed.
"""

from __future__ import annotations

import os
from pathlib import Path

POINTER = "ACTIVE"


class ActiveAdapter:
    def __init__(self, adapters_dir: Path) -> None:
        self.dir = Path(adapters_dir)
        self._stamp: tuple[int, int] | None = None
        self._value: tuple[str, Path] | None = None

    def __call__(self) -> tuple[str, Path] | None:
        pointer = self.dir / POINTER
        try:
            st = os.stat(pointer)
        except FileNotFoundError:
            self._stamp, self._value = None, None
            return None
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._stamp:
            version = pointer.read_text(encoding="utf-8").strip()
            self._value = (version, self.dir / version) if version else None
            self._stamp = stamp
        return self._value


class FixedAdapter:
    """One adapter given by path (``--adapter PATH``), not following the registry."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __call__(self) -> tuple[str, Path] | None:
        return (self.path.name, self.path)
