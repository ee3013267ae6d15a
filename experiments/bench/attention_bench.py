r"""Attention benchmark: exact compiled memory/FLOPs and median wall time per method and length.

    python -m experiments.benchmark --workdir=/tmp/longctx_bench
    python -m experiments.benchmark --preset=acceptance --workdir=/tmp/longctx_bench

For every (method, mask, length) it compiles forward and forward+backward once, reads the
temp memory (`memory_analysis().temp_size_in_bytes`) and XLA's FLOP count
(`cost_analysis()`; note XLA counts a while-loop body once, so blockwise methods report the
FLOPs of one tile) next to the useful attention FLOPs (4 * B * N * H per visible (q, k) pair
forward; 3.5x that forward+backward, the FlashAttention convention), then times the call:
median of `--repeats` runs after one warm-up. Times are only comparable within one run; the
headline speed-ups are re-timed pairwise (`paired_ratio`: max(3, `--repeats`) rounds timing the
two side by side, median ratio), which keeps a shared machine's speed drifts out of the ratios.
Writes `benchmark.csv` and `benchmark.png` (log-log memory and time vs length) under
`--workdir` and prints the table.

The functions take their sizes as arguments (`Settings`); `experiments/benchmark.py` reads the
flags (`bench/presets.py`: the named presets).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import attention
from attention import Mask
from experiments.bench.timing import median_seconds, paired_ratio
from experiments.training import plots


@dataclasses.dataclass(frozen=True)
class Settings:
  """Shapes and limits of a benchmark run (the flags of the same names)."""
  batch: int = 1
  heads: int = 4
  kv_heads: int | None = None   # None = heads
  head_dim: int = 64
  dtype: str = "float32"
  window: int = 256             # local attention: the last `window` keys
  repeats: int = 3              # timed calls (median) after one warm-up
  quadratic_max_len: int = 32768
  time_max_len: int = 8192
  time_bwd_max_len: int = 8192
  quadratic_time_max_len: int = 4096


@dataclasses.dataclass(frozen=True)
class Method:
  """How to call one attention method: `build(causal, window) -> (fn(q, k, v), visibility)`."""
  build: Callable[[bool, int], tuple[Callable, Mask]]
  quadratic: bool = False  # materialises T x S: compiled/timed only up to the quadratic limits
  keys_per_query: int | None = None  # attends to at most this many keys (DSA's top_k)


def _registered(name: str, **options) -> Callable[[bool, int], tuple[Callable, Mask]]:
  def build(causal: bool, window: int):
    del window  # full or causal
    mask = Mask(causal=causal)
    fn = attention.get(name)
    return (lambda q, k, v: fn(q, k, v, mask=mask, **options)), mask
  return build


def _local(causal: bool, window: int):
  del causal  # a sliding window over the past
  mask = attention.local_mask(window, causal=True)
  return (lambda q, k, v: attention.local_attention(q, k, v, mask=Mask(causal=True),
                                                    window=window)), mask


def _jax_xla(causal: bool, window: int):
  del window
  fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                    implementation="xla")
  return fn, Mask(causal=causal)


DSA_TOP_K = 2048  # DeepSeek-V3.2's top_k


def _dsa(causal: bool, window: int = 0, index_heads: int = 4, index_dim: int = 32,
         top_k: int = DSA_TOP_K):
  """DeepSeek sparse attention; its indexer inputs are fixed random projections of q and k
  (seeded, so every call sees the same function): q_I, w from q, k_I from k (the layer's
  projections from the hidden state cost the same). Timed: indexer + top-k + sparse gather."""
  del window
  mask = Mask(causal=causal)

  def fn(q, k, v):
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    wq, wk, ww = (jax.random.normal(key, shape, q.dtype) * shape[0] ** -0.5 for key, shape in zip(
        jax.random.split(jax.random.key(0), 3),
        ((n * h, index_heads * index_dim), (kh * h, index_dim), (n * h, index_heads))))
    index_q = (q.reshape(b, t, n * h) @ wq).reshape(b, t, index_heads, index_dim)
    index_k = k.reshape(b, s, kh * h) @ wk
    index_w = (q.reshape(b, t, n * h) @ ww) * index_heads ** -0.5
    return attention.dsa_attention(q, k, v, mask=mask, index_q=index_q, index_k=index_k,
                                   index_w=index_w, top_k=top_k)
  return fn, mask


METHODS: dict[str, Method] = {
    "jax": Method(_jax_xla, quadratic=True),
    "dense": Method(_registered("dense"), quadratic=True),
    "flash": Method(_registered("flash")),
    "local": Method(_local),
    "dsa": Method(_dsa, keys_per_query=DSA_TOP_K),
}


def compiled_stats(fn, *args) -> tuple[Callable, float, float]:
  """`(compiled, temp MiB, XLA GFLOPs)` of `jax.jit(fn)` for these argument shapes."""
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
  return compiled, temp, float(cost.get("flops", float("nan"))) / 1e9


def run_one(method: str, causal: bool, length: int, settings: Settings = Settings(),
            timed: dict | None = None) -> dict:
  """One table row; the timed forward `(compiled, args)` goes into `timed[(method, mask, T)]`."""
  fn, mask = METHODS[method].build(causal, settings.window)
  b, n, h = settings.batch, settings.heads, settings.head_dim
  kh = settings.kv_heads or n
  dtype = jnp.dtype(settings.dtype)
  shapes = (jax.ShapeDtypeStruct((b, length, n, h), dtype),
            jax.ShapeDtypeStruct((b, length, kh, h), dtype),
            jax.ShapeDtypeStruct((b, length, kh, h), dtype))
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))
  fwd_bwd = jax.grad(loss, argnums=(0, 1, 2))
  fwd_c, fwd_mem, fwd_xla = compiled_stats(fn, *shapes)
  bwd_c, bwd_mem, bwd_xla = compiled_stats(fwd_bwd, *shapes)
  useful = 4.0 * b * n * h * attention.visible_pairs(mask, length, length,
                                                      METHODS[method].keys_per_query) / 1e9
  row = dict(method=method, mask=_mask_name(mask), length=length,
             fwd_temp_mib=fwd_mem, fwd_gflops_xla=fwd_xla, fwd_gflops_attn=useful,
             fwdbwd_temp_mib=bwd_mem, fwdbwd_gflops_xla=bwd_xla, fwdbwd_gflops_attn=3.5 * useful,
             fwd_ms=float("nan"), fwdbwd_ms=float("nan"))
  quadratic = METHODS[method].quadratic
  quadratic_limit = settings.quadratic_time_max_len if quadratic else 1 << 62
  time_max = min(settings.time_max_len, quadratic_limit)
  time_bwd_max = min(settings.time_bwd_max_len, quadratic_limit)
  if length <= time_max or length <= time_bwd_max:
    keys = jax.random.split(jax.random.key(length), 3)
    args = [jax.random.normal(key, s.shape, jnp.float32).astype(dtype)
            for key, s in zip(keys, shapes)]
    if length <= time_max:
      row["fwd_ms"] = 1e3 * median_seconds(fwd_c, args, settings.repeats)
      if timed is not None:
        timed[(method, row["mask"], length)] = (fwd_c, args)
    if length <= time_bwd_max:
      row["fwdbwd_ms"] = 1e3 * median_seconds(bwd_c, args, settings.repeats)
  return row


def _mask_name(mask: Mask) -> str:
  if mask.window is not None:
    return f"window{mask.window}"
  return "causal" if mask.causal else "full"


COLUMNS = ["method", "mask", "length", "fwd_temp_mib", "fwdbwd_temp_mib", "fwd_gflops_attn",
           "fwd_gflops_xla", "fwdbwd_gflops_xla", "fwd_ms", "fwdbwd_ms"]


def format_table(rows: list[dict]) -> str:
  def fmt(value):
    if isinstance(value, float):
      return "-" if np.isnan(value) else f"{value:.1f}"
    return str(value)
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
  return "\n".join(lines)


def ratios(rows: list[dict], timed: dict | None = None, window: int = 256,
           repeats: int = 3) -> list[str]:
  """Headline ratios measured in this run (only those whose rows exist).

  With `timed` (forward `(compiled, args)` per row), time ratios are re-measured pairwise
  (`paired_ratio`, max(3, `repeats`) rounds); the ratio of the table's medians is shown next
  to it. `window` names the local rows (`window(window - 1, 0)`).
  """
  by = {(r["method"], r["mask"], r["length"]): r for r in rows}
  out = []

  def ratio(a, b, col):
    if a in by and b in by and not np.isnan(by[a][col]) and not np.isnan(by[b][col]):
      return by[b][col] / by[a][col]
    return None

  local = f"window{(window - 1, 0)}"
  checks = [
      ("flash fwd vs jax.nn.dot_product_attention, full, 8192", ("flash", "full", 8192),
       ("jax", "full", 8192), "fwd_ms"),
      ("flash causal vs flash full fwd, 8192", ("flash", "causal", 8192),
       ("flash", "full", 8192), "fwd_ms"),
      (f"local {local} vs causal flash fwd, 32768", ("local", local, 32768),
       ("flash", "causal", 32768), "fwd_ms"),
  ]
  for label, fast, slow, col in checks:
    value = ratio(fast, slow, col)
    if value is None:
      continue
    if timed and fast in timed and slow in timed:
      rounds = max(3, repeats)
      paired = paired_ratio(timed[fast][0], timed[slow][0], timed[fast][1], timed[slow][1],
                            rounds=rounds)
      out.append(f"{label}: {paired:.2f}x faster (paired: median of {rounds} side-by-side "
                 f"rounds; table medians: {value:.2f}x)")
    else:
      out.append(f"{label}: {value:.2f}x faster")
  lengths = sorted({r["length"] for r in rows})
  for method, mask in sorted({(r["method"], r["mask"]) for r in rows}):
    have = [t for t in lengths if (method, mask, t) in by]
    pairs = [(t, 8 * t) for t in have if 8 * t in have]
    for small, large in pairs[:1]:
      growth = ratio((method, mask, small), (method, mask, large), "fwdbwd_temp_mib")
      out.append(f"{method} {mask} fwd+bwd temp memory {small} -> {large} tokens: "
                 f"grows {growth:.1f}x")
  return out


def plot(rows: list[dict], path: str) -> None:
  fig, axes = plots.figure(1, 2, figsize=(12, 4.5))
  for method, mask in sorted({(r["method"], r["mask"]) for r in rows}):
    sel = sorted((r for r in rows if (r["method"], r["mask"]) == (method, mask)),
                 key=lambda r: r["length"])
    lengths = [r["length"] for r in sel]
    axes[0].loglog(lengths, [max(r["fwdbwd_temp_mib"], 1e-3) for r in sel], "o-",
                   label=f"{method} ({mask})")
    timed = [(r["length"], r["fwd_ms"]) for r in sel if not np.isnan(r["fwd_ms"])]
    if timed:
      axes[1].loglog(*zip(*timed), "o-", label=f"{method} ({mask})")
  plots.label(axes[0], xlabel="tokens", ylabel="fwd+bwd temp memory (MiB)",
              title="Compiled temp memory (exact)", legend_size=8, grid_which="both")
  plots.label(axes[1], xlabel="tokens", ylabel="forward time (ms, median)",
              title=f"Forward wall time ({jax.default_backend()})", legend_size=8,
              grid_which="both")
  plots.save(fig, path, dpi=120)


def run(methods: list[str], lengths: list[int], causal_values: list[bool], settings: Settings,
        workdir: str) -> list[dict]:
  """Every (method, mask, length) row; writes `benchmark.csv`/`.png` under `workdir` and prints
  the table and the headline ratios."""
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ValueError(f"unknown methods {unknown}; available: {sorted(METHODS)}")
  os.makedirs(workdir, exist_ok=True)
  rows, timed = [], {}
  print(f"backend={jax.default_backend()} B={settings.batch} N={settings.heads} "
        f"H={settings.head_dim} dtype={settings.dtype}", flush=True)
  for method in methods:
    for causal in (causal_values if method != "local" else [True]):
      for length in lengths:
        if METHODS[method].quadratic and length > settings.quadratic_max_len:
          continue
        start = time.perf_counter()
        row = run_one(method, causal, length, settings, timed)
        rows.append(row)
        print(f"  {method:6s} {row['mask']:18s} {length:7d}  fwd {row['fwd_ms']:9.1f} ms  "
              f"fwd+bwd temp {row['fwdbwd_temp_mib']:9.1f} MiB  "
              f"({time.perf_counter() - start:.0f}s)", flush=True)
  with open(os.path.join(workdir, "benchmark.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  plot(rows, os.path.join(workdir, "benchmark.png"))
  print(format_table(rows))
  print("\n".join(ratios(rows, timed, settings.window, settings.repeats)), flush=True)
  print(f"wrote {workdir}/benchmark.csv and benchmark.png")
  return rows
