"""One-time work in a child process: a long job's peak memory is then its own steady state.

Converting the packaged tokenizer from its GGUF, timing the embedder's precision and assembling the
multilingual embedder's caches each run once per data directory, and each leaves a caller holding
what it no longer needs: transformers and the GGUF reader (~200 MB), an fp32 copy of MiniLM, the
tokenizer's protobuf parse. In a child, all of it goes when the child exits; the caller then reads
the caches the child wrote, as every later run does.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence

log = logging.getLogger(__name__)


def run_python(code: str, args: Sequence[str], what: str, timeout: float = 600) -> bool:
    """Run ``code`` (with ``args`` as ``sys.argv[1:]``) in a child Python that imports what this one
    does. False, logged, where it could not start or failed: the caller then does the work itself,
    which reports any error the way it always has."""
    if getattr(sys, "frozen", False):  # a bundled app: sys.executable is not a Python to run code with
        return False
    # this process's module path, its working folder ('') spelled out: the child runs with -P
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
    try:  # -P: the working folder's files cannot stand in for our modules
        done = subprocess.run([sys.executable, "-P", "-c", code, *args], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("%s in a child process failed (%s); doing it here", what, exc)
        return False
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        log.info("%s in a child process failed (%s); doing it here", what, tail[0])
        return False
    return True
