"""Crash points for the fault-injection tests.

`crash_point(name)` kills the process with SIGKILL when the environment
variable IDML_INDEX_CRASH_AT equals `name` (or `name:N`, to crash on the Nth
time the point is reached). Without the variable it does nothing. The tests use
it to stop a child process at the exact steps where a crash is hardest to
recover from.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "IDML_INDEX_CRASH_AT"

_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    target = os.environ.get(ENV_VAR)
    if not target:
        return
    point, _, nth = target.partition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= (int(nth) if nth else 1):
        os.kill(os.getpid(), signal.SIGKILL)
