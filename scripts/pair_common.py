"""Shared by the CPU pair scripts (``mdlm_cpu_pair.py``, ``huginn_cpu_pair.py``): the repository root and
:func:`sh`, one logged subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sh(cmd: list[str], log: Path | None = None) -> str:
    """Run ``cmd`` in the repository root on one thread (``OMP_NUM_THREADS=1``), its output written to
    ``log``; a failure exits with the command and the output's tail."""
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(out)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return out
