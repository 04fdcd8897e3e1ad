"""SIGTERM / SIGINT as a flag the training loop polls, and the step every process stops at.

    with PreemptionGuard(multi_process=jax.process_count() > 1) as guard:
        for step in ...:
            ...
            if guard.stop_at(step):
                checkpoint(step, force=True)
                break
"""
from __future__ import annotations

import logging
import signal
from typing import Any

log = logging.getLogger(__name__)


class PreemptionGuard:
    """Context manager turning SIGTERM/SIGINT into a flag the training loop polls.

    Inside the `with` block the signals set `requested` (and `signal_received`)
    instead of killing the process, so the loop can finish its step, save with
    force=True and exit cleanly. A second SIGINT raises KeyboardInterrupt, so Ctrl-C
    twice still stops a stuck run. The previous handlers come back on exit. Must be
    entered from the main thread (a Python signal rule).

    The loop asks `stop_at(step)` after every step. In one process that is the flag.
    In a multi-process run every process must save the same step, and the signal may
    reach only one of them: there the guard installs no handler and leaves SIGTERM to
    jax.distributed's preemption service (its notifier catches the signal and tells the
    coordinator), and `stop_at(step)` is true on every process at the one step they
    agree on (multihost_utils.reached_preemption_sync_point: the largest step any of
    them had reached when the notice arrived, plus one). It must then be asked at every
    step by every process.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), multi_process: bool = False):
        self.multi_process = multi_process
        self._signals = () if multi_process else tuple(signals)
        self._previous: dict[int, Any] = {}
        self.requested = False
        self.signal_received: int | None = None

    def stop_at(self, step: int) -> bool:
        """Whether to checkpoint and stop after `step` (agreed by all processes)."""
        if self.multi_process and not self.requested:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            self.requested = bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_received = signum
        log.warning("Received %s: will checkpoint and stop after this step.",
                    signal.Signals(signum).name)

    def __enter__(self) -> PreemptionGuard:
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            # None means the old handler was installed outside Python; default is closest.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
