"""Wall-clock timing of jitted calls (shared by the benchmark, dsa_bench and the GPU check scripts)."""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np


def seconds_per_call(fn, *args, samples: int = 5, sample_s: float = 0.08) -> float:
  """Median seconds per call of `fn(*args)`.

  After a warm-up (compile) call, `samples` timings of enough back-to-back calls to fill about
  `sample_s` each (asynchronous dispatch hides the Python overhead); slow calls (> 0.3 s) get
  at most 3 samples of one call, to keep a run short.
  """
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  calls = int(np.clip(sample_s / max(first, 1e-6), 1, 50))
  samples = samples if first < 0.3 else min(samples, 3)
  times = []
  for _ in range(samples):
    start = time.perf_counter()
    out = [fn(*args) for _ in range(calls)]
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return statistics.median(times)


def median_seconds(compiled, args, repeats: int) -> float:
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def paired_ratio(fast, slow, args_fast, args_slow, rounds: int = 3, calls: int = 3) -> float:
  """Median over `rounds` of `median_seconds(slow) / median_seconds(fast)`, side by side.

  A shared machine's speed drifts over minutes; timing the two halves of a ratio next to each
  other keeps the drift out of it. Each half is a block (one warm-up, then the median of
  `calls`), not a single call: the first calls after switching from a memory-hungry method
  run up to ~1.5x slower (page and cache traffic), which a block's median absorbs. The order
  alternates each round.
  """
  ratios_ = []
  for r in range(rounds):
    halves = [("fast", fast, args_fast), ("slow", slow, args_slow)]
    times = {name: median_seconds(fn, args, calls)
             for name, fn, args in (halves if r % 2 == 0 else halves[::-1])}
    ratios_.append(times["slow"] / times["fast"])
  return float(np.median(ratios_))
