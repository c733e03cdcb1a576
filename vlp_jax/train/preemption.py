"""SIGTERM / SIGINT handling: finish the current step, checkpoint, exit with a distinct code.

Cluster schedulers (TPU pods, SLURM, Kubernetes) send SIGTERM before preempting a job. The
trainer polls `PreemptionGuard.requested` after every step; when set, it saves a checkpoint
of the state it just computed and raises `Preempted`, which the CLI turns into exit code
`EXIT_PREEMPTED` (75, EX_TEMPFAIL: "try again"); rerunning with the same workdir resumes.
In a multi-process job every process must agree to stop at the same step, so the flag is
combined across processes.
"""
from __future__ import annotations

import signal
import threading

import jax
import numpy as np

EXIT_PREEMPTED = 75


class Preempted(Exception):
    def __init__(self, step: int):
        super().__init__(f"preempted: checkpoint written at step {step}; rerun to resume")
        self.step = step


class PreemptionGuard:
    """Context manager installing SIGTERM/SIGINT handlers that only set a flag."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self._flag = threading.Event()
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        self._flag.set()

    def requested(self) -> bool:
        """True on every process if any process received a signal."""
        local = self._flag.is_set()
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.array([local], dtype=np.int32))
        return bool(np.asarray(flags).any())
