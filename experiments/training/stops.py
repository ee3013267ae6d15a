"""Why a run stops before `num_steps`, and the exit code `python -m experiments.train` gives it.

    with StopSignals() as signals:                 # SIGTERM / SIGINT / SIGUSR1 set a flag
      for step in ...:
        train_step(...)
        if signals.agreed():                       # every process agrees (one allgather)
          save(step); raise Preempted(step, ...)   # exit code 75: run the same command again

Exit codes (the command's contract; a scheduler may requeue on 75):

    0   the run reached num_steps
    1   an error of the command or the workdir (one line; the traceback in train.log)
    2   a bad flag or config field (one line)
    3   Diverged: `max_nonfinite_steps` steps in a row had a non-finite loss or gradients
    74  WriteFailed: a checkpoint or metrics.jsonl could not be written (disk full, permission)
    75  Preempted: a signal asked the run to stop; it saved the step it finished

Each early stop is an exception carrying its code (`RunStopped.exit_code`); train.py prints
its one-line message and exits with the code. Signals are caught only between steps: the step
in flight finishes (a jitted step cannot be interrupted anyway), then the loop checkpoints it.
With several processes, a signal may reach only some of them (or reach them between different
steps), so each step boundary all-gathers the flags: every process stops at the same step and
takes part in the same checkpoint. A second SIGINT raises `KeyboardInterrupt` at once (the
usual way out of a run that should not wait for its step).
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class RunStopped(RuntimeError):
  """A run stopped before `num_steps`; `exit_code` is what the command exits with, `label`
  the word its one-line message starts with."""
  exit_code = 1
  label = "error"


class Diverged(RunStopped):
  """Too many non-finite steps in a row; the parameters were left at the last finite step."""
  exit_code = 3


class WriteFailed(RunStopped):
  """A checkpoint or the metrics file could not be written; older checkpoints are intact."""
  exit_code = 74


class Preempted(RunStopped):
  """A signal stopped the run after a step, which was checkpointed: rerun to resume."""
  exit_code = 75
  label = "stopped"


EXIT_CODES = {cls.__name__: cls.exit_code for cls in (Diverged, WriteFailed, Preempted)}


class StopSignals:
  """Context manager: while open, `SIGNALS` set a flag instead of killing the process.

  The previous handlers come back on exit. Outside the main thread (where Python cannot
  install handlers) it catches nothing and `agreed()` only reflects other processes.
  """

  def __init__(self):
    self.received: str | None = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the step
    self.received = signal.Signals(signum).name

  def agreed(self) -> bool:
    """Whether any process received a stop signal: the same answer on every process.

    One process: the local flag, no communication. Several: an allgather of the flags (a few
    bytes per step boundary; every process must call this at every boundary).
    """
    local = self.received is not None
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.array([local], dtype=np.int32))
    if self.received is None and np.any(flags):
      self.received = "a peer process's signal"
    return bool(np.any(flags))
