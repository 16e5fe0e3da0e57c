"""Test hook: deterministic faults at named points of a batch job.

Crash tests need to stop a job at an exact point (right after part N is committed, or with part
N half written), not at whatever moment a polling test happens to notice a file. The jobs call
`FaultPlan.at(point, part)` at those points; it does nothing unless the environment asks:

    INSTRUCTREC_TEST_FAULT="<action>-<point>:<part>"    e.g. kill-after-part:0, kill-in-part:3

- points: `in-part` (the first chunk of the part is written to its temp file, not yet
  published), `after-part` (the part is published and its commit record written, in the process
  that wrote it), `driver-after-parts` (the Ray driver has collected that many finished parts;
  the number counts parts, not an index).
- actions: `kill` (SIGKILL this process: nothing is flushed, no handler runs, as with kill -9 or
  an OOM kill), `pause` (write this process's pid to `$INSTRUCTREC_TEST_FAULT_DIR/paused-<pid>`
  and sleep until killed, so a test can kill that very process by its pid; gives up after
  `PAUSE_LIMIT_S` and goes on).
- `INSTRUCTREC_TEST_FAULT_DIR`, when set, makes a fault fire once across all processes (the first
  to create `<dir>/fired` wins): a restarted Ray actor that retries the part does not fire again.

It is a test hook: a production job never sets these variables. The Ray driver reads them and
passes the plan to its actors explicitly, so it reaches actors on every node.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

__all__ = ["FAULT_ENV", "FAULT_DIR_ENV", "FaultPlan", "POINTS", "ACTIONS"]

log = logging.getLogger(__name__)

FAULT_ENV = "INSTRUCTREC_TEST_FAULT"
FAULT_DIR_ENV = "INSTRUCTREC_TEST_FAULT_DIR"
POINTS = ("in-part", "after-part", "driver-after-parts")
ACTIONS = ("kill", "pause")
PAUSE_LIMIT_S = 300.0


@dataclass(frozen=True)
class FaultPlan:
    action: str | None = None
    point: str | None = None
    part: int = -1
    once_dir: str | None = None

    @classmethod
    def from_env(cls) -> "FaultPlan":
        spec = os.environ.get(FAULT_ENV, "").strip()
        if not spec:
            return cls()
        head, _, number = spec.partition(":")
        action, _, point = head.partition("-")
        if action not in ACTIONS or point not in POINTS or not number.isdigit():
            raise InputError(FAULT_ENV, f"{spec!r} is not <action>-<point>:<part>",
                             f"actions {', '.join(ACTIONS)}; points {', '.join(POINTS)} (a test hook: unset it)")
        return cls(action, point, int(number), os.environ.get(FAULT_DIR_ENV) or None)

    def at(self, point: str, part: int) -> None:
        """Fire the planned fault if this is its point (a no-op without a plan)."""
        if self.action is None or point != self.point or part != self.part or not self._claim():
            return
        log.warning("test hook %s: %s at %s %d (pid %d)", FAULT_ENV, self.action, point, part, os.getpid())
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        deadline = time.monotonic() + PAUSE_LIMIT_S
        if self.once_dir:
            (Path(self.once_dir) / f"paused-{os.getpid()}").write_text(str(os.getpid()))
        while time.monotonic() < deadline:
            time.sleep(0.05)

    def _claim(self) -> bool:
        if not self.once_dir:
            return True
        try:
            fd = os.open(Path(self.once_dir) / "fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True
