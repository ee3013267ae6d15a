"""Wall-clock timing of jitted calls on an accelerator (shared by the GPU check scripts)."""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np


def seconds_per_call(fn, *args, samples: int = 5, sample_s: float = 0.08) -> float:
  """Median seconds per call of `fn(*args)`.

  After a warm-up (compile) call, `samples` timings of enough back-to-back calls to fill about
  `sample_s` each (asynchronous dispatch hides the Python overhead); slow calls (> 0.3 s) get
  3 samples of one call, to keep a run short.
  """
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  calls = int(np.clip(sample_s / max(first, 1e-6), 1, 50))
  samples = samples if first < 0.3 else 3
  times = []
  for _ in range(samples):
    start = time.perf_counter()
    out = [fn(*args) for _ in range(calls)]
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return statistics.median(times)
