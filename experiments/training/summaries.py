"""Training scalars as TensorBoard event files in the workdir: watch a long run live with

    tensorboard --logdir=<workdir>

Every line `metrics.jsonl` gets (loss, learning rate, tokens/s, gradient norm, the periodic
held-out scores) is also written as scalars at its step by `tensorboardX` (event files
`events.out.tfevents.*` in the workdir, flushed at each line). Only process 0 writes (the loop
makes a writer only there). A resumed run opens a new event file that purges the old files'
events past the restored step, so the curves stay those of one run.
"""

from __future__ import annotations

import numbers
import os
from typing import Any

import tensorboardX


class Scalars:
  """A TensorBoard writer of metric rows (`{"step": N, name: number, ...}`)."""

  def __init__(self, logdir: str, start_step: int = 0):
    # The file name holds the second it was made: the pid and start step keep a run resumed
    # within the same second from truncating its predecessor's file.
    self.writer = tensorboardX.SummaryWriter(
        logdir=logdir, purge_step=start_step + 1 if start_step else None, flush_secs=30,
        filename_suffix=f".{os.getpid()}.{start_step}")

  def write(self, row: dict[str, Any]) -> None:
    """Each number of `row` (but `step`, its x value) as a scalar, then a flush."""
    for name, value in row.items():
      if name != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
        self.writer.add_scalar(name, float(value), int(row["step"]))
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()
