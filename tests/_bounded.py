"""Run a probe in a child Python under an address-space limit and a wall-clock limit.

Hostile files must never make the engine allocate more than they hold. In the test process itself an attempt to
allocate 160 GB might even succeed lazily (overcommit) and go unnoticed; in a child whose address space is capped
(RLIMIT_AS) it fails at once, and any exception other than the engine's own errors fails the probe. A hang shows up
as the timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# torch + diffusers + transformers reserve ~1 GiB of address space on import (VmPeak 0.95 GiB here); 4 GiB leaves
# ~3 GiB for the probe: a loader that tried to build what a hostile config asks for (38-160 GB) fails at once.
MEMORY_BOUND = 4 << 30


def run_bounded(code: str, *, timeout: float, limit: int = MEMORY_BOUND, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -c code` with RLIMIT_AS = `limit` bytes; the result has stdout/stderr as text."""
    try:
        import resource
    except ImportError:  # Windows
        pytest.skip("needs resource.RLIMIT_AS (POSIX)")

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    child_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env, preexec_fn=cap, capture_output=True,
                          text=True, timeout=timeout)
