r"""Decode at the memory bound: the dense and DSA decode steps next to the time to read the cache.

    python -m experiments.benchmark --preset=decode                      # 8K, 32K, 131072 tokens
    python -m experiments.benchmark --preset=decode --lengths=131072 --repeats=7

One new token (8 query heads, head_dim 64) at position S - 1 of an S-token cache, for every
cache length S, KV heads K in (1, 8) (MQA; MHA) and batch B in (1, 8), three steps:

    read   jnp.sum over the cache's K and V: reading it once, the bound of a decode step
    dense  attention.flash_attention (T = 1: the decode path, `attention/decode_xla.py`)
    DSA    attention.dsa_attention: the lightning indexer (4 heads x 32 dims) over the cached
           FP8 indexer keys (float8 + one float32 scale per key, as the DSA layer's decode cache
           holds them), top-k 2048 shared by all heads, gather attention over the selected rows

Bytes per step (arithmetic, per batch row): read and dense 2 S K H itemsize; DSA S (D_I + 4)
(the FP8 indexer keys and their scales) + 2 top_k K H itemsize (the gathered K/V rows). GB/s =
those bytes / the step's time (GB = 1e9 bytes).

Timing: the six steps of one (S, K), the three steps at both batches, are timed in `rounds`
rounds; each round times every step as a block (`timing.median_seconds`: a warm-up call, then
the median of `calls`), in an order that rotates each round. Every ratio is taken within a
round and the medians over rounds are reported: dense / read (goal <= 2x at 131072), dense /
DSA (goal >= 3x at 131072, growing with S), and batch 8's tokens/s over batch 1's
(`8 t(B=1) / t(B=8)`; goal >= 6x). The ms columns are each step's median over rounds, so on a
loaded machine a ratio need not equal the quotient of two ms columns. The table is printed as
each (S, K) finishes, between the load averages at the start and the end, and written to
`decode.csv` under `--workdir`.

Cold caches: each call of a step reads its own copy of the inputs, cycling through as many
copies as fill `working_set` bytes (default twice this machine's 260 MiB last-level cache), so a
call never finds its cache left in L3 by the previous one -- as in a model, whose layers each
read their own cache. (One copy, `working_set=0`, times L3-resident reads at small caches.)
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np

import attention
from attention import Mask, fp8
from experiments.bench.timing import median_seconds

STEPS = ("read", "dense", "dsa")
WORKING_SET = 512 * 2**20  # bytes of input copies a step cycles through (2x the 260 MiB L3)
_quantize = jax.jit(fp8.quantize, static_argnums=1)


@dataclasses.dataclass(frozen=True)
class Shape:
  """What every cell shares (module docstring); `lengths`, `batches`, `kv_heads` are swept."""
  heads: int = 8
  head_dim: int = 64
  index_heads: int = 4
  index_dim: int = 32
  top_k: int = 2048
  dtype: str = "float32"


def _copy(rng: np.random.Generator, b: int, s: int, kv_heads: int, shape: Shape) -> dict:
  """One set of inputs: q, k, v, index_q, the FP8 indexer keys, index_w (Gaussian)."""
  dtype = jnp.dtype(shape.dtype)
  normal = lambda *dims: jnp.asarray(rng.standard_normal(dims, np.float32))
  fmt = fp8.Fp8Format(min(shape.index_dim, fp8.DEFAULT_BLOCK))
  return dict(q=normal(b, 1, shape.heads, shape.head_dim).astype(dtype),
              k=normal(b, s, kv_heads, shape.head_dim).astype(dtype),
              v=normal(b, s, kv_heads, shape.head_dim).astype(dtype),
              index_q=normal(b, 1, shape.index_heads, shape.index_dim).astype(dtype),
              index_k=_quantize(normal(b, s, shape.index_dim), fmt),
              index_w=normal(b, 1, shape.index_heads) * shape.index_heads ** -0.5)


def step_bytes(b: int, s: int, kv_heads: int, shape: Shape) -> dict[str, int]:
  """Bytes each step must read (module docstring)."""
  item = jnp.dtype(shape.dtype).itemsize
  cache = 2 * b * s * kv_heads * shape.head_dim * item
  index_keys = b * s * (shape.index_dim + 4 * (shape.index_dim // min(shape.index_dim,
                                                                      fp8.DEFAULT_BLOCK)))
  gathered = 2 * b * min(shape.top_k, s) * kv_heads * shape.head_dim * item
  return dict(read=cache, dense=cache, dsa=index_keys + gathered)


def _steps(s: int, shape: Shape) -> dict:
  """name -> jitted fn(inputs dict)."""
  mask = Mask(causal=True, q_offset=s - 1)  # the new token is the cache's last
  fmt = fp8.Fp8Format(min(shape.index_dim, fp8.DEFAULT_BLOCK))
  total = lambda x: jnp.sum(x, dtype=jnp.float32)
  return dict(
      read=jax.jit(lambda x: total(x["k"]) + total(x["v"])),
      dense=jax.jit(lambda x: attention.flash_attention(x["q"], x["k"], x["v"], mask=mask)),
      dsa=jax.jit(lambda x: attention.dsa_attention(
          x["q"], x["k"], x["v"], mask=mask, index_q=x["index_q"], index_k=x["index_k"],
          index_w=x["index_w"], top_k=shape.top_k, fp8=fmt)))


def _cycling(fn, copies):
  """A no-argument call of `fn` on the next copy each time."""
  nxt = itertools.cycle(copies).__next__
  return lambda: fn(nxt())


def measure_group(s: int, kv_heads: int, batches, shape: Shape, *, rounds: int, calls: int,
                  working_set: int = WORKING_SET, seed: int = 0) -> dict:
  """`{(step, B): [seconds per round]}` for the steps of one (S, K) at every batch, interleaved."""
  steps, blocks = _steps(s, shape), {}
  for b in batches:
    rng = np.random.default_rng([seed, b])
    copies = [_copy(rng, b, s, kv_heads, shape)]
    per_copy = sum(x.nbytes for x in jax.tree.leaves(copies[0]))
    copies += [_copy(rng, b, s, kv_heads, shape) for _ in range(1, -(-working_set // per_copy))]
    for name, fn in steps.items():
      blocks[(name, b)] = _cycling(fn, copies)
  times = {key: [] for key in blocks}
  order = list(blocks)
  for r in range(rounds):
    shift = r % len(order)
    for key in order[shift:] + order[:shift]:
      times[key].append(median_seconds(blocks[key], (), calls))
  return times


def cells(times: dict, s: int, kv_heads: int, batches, shape: Shape) -> list[dict]:
  """One row per batch: median ms and GB/s per step, the paired ratios (module docstring)."""
  med = lambda xs: float(np.median(xs))
  rows = []
  for b in batches:
    t = {n: np.asarray(times[(n, b)]) for n in STEPS}
    nbytes = step_bytes(b, s, kv_heads, shape)
    row = dict(cache_len=s, kv_heads=kv_heads, batch=b, cache_mib=nbytes["read"] / 2**20,
               dsa_mib=nbytes["dsa"] / 2**20)
    for n in STEPS:
      row[f"{n}_ms"] = 1e3 * med(t[n])
      row[f"{n}_gbs"] = nbytes[n] / med(t[n]) / 1e9
    row["dense_over_read"] = med(t["dense"] / t["read"])
    row["dense_over_dsa"] = med(t["dense"] / t["dsa"])
    b1 = min(batches)
    for n in STEPS:  # tokens/s at this batch over the smallest batch's, paired per round
      row[f"{n}_tokens_x"] = med(b * np.asarray(times[(n, b1)]) / (b1 * t[n]))
    rows.append(row)
  return rows


def run(lengths, shape: Shape = Shape(), *, batches=(1, 8), kv_heads=(1, 8), rounds: int = 5,
        calls: int = 3, working_set: int = WORKING_SET, workdir: str | None = None,
        echo=print) -> list[dict]:
  """Every cell, group by group (printed as they come); `decode.csv` under `workdir`."""
  rows = []
  echo(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  echo(HEADER + "\n" + SEPARATOR)
  for s in lengths:
    for kh in kv_heads:
      times = measure_group(s, kh, batches, shape, rounds=rounds, calls=calls,
                            working_set=working_set)
      new = cells(times, s, kh, batches, shape)
      rows += new
      for row in new:
        echo(_line(row))
  echo(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "decode.csv"), "w", newline="") as f:
      writer = csv.DictWriter(f, list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
  return rows


HEADER = ("| cache | K | B | cache MiB | read ms | dense ms | DSA ms | dense / read | dense / DSA "
          "| read GB/s | dense GB/s | DSA GB/s (MiB) | tokens/s vs B=1: dense, DSA |")
SEPARATOR = "|" + "---|" * (HEADER.count("|") - 1)


def _line(r: dict) -> str:
  return (f"| {r['cache_len']} | {r['kv_heads']} | {r['batch']} | {r['cache_mib']:.0f} "
          f"| {r['read_ms']:.2f} | {r['dense_ms']:.2f} | {r['dsa_ms']:.2f} "
          f"| {r['dense_over_read']:.2f}x | {r['dense_over_dsa']:.2f}x | {r['read_gbs']:.1f} "
          f"| {r['dense_gbs']:.1f} | {r['dsa_gbs']:.1f} ({r['dsa_mib']:.1f}) "
          f"| {r['dense_tokens_x']:.2f}x, {r['dsa_tokens_x']:.2f}x |")


def table(rows: list[dict]) -> str:
  return "\n".join([HEADER, SEPARATOR] + [_line(r) for r in rows])
