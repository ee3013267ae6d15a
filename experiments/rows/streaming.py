"""Row 9: decoding past the training length with a window cache, attention sinks (StreamingLLM)
and learned sink logits (GPT-OSS).

Two byte-level decoders train on the Python standard library (`text.py:global`, every 10th file
held out) at length L, the same sizes, steps, data and seeds:

* `global`: every layer global (RoPE theta 160k, `text.py:global`);
* `sink_logits`: every layer a window of W tokens with a learned per-head sink logit
  (`KindSettings(window=W, sink=True)`).

Each decodes held-out rows of `multiple` x L bytes that lie inside one file, `chunk` bytes per
step through its KV cache (`model(tokens, cache=...)` in a scan, from an empty cache: exactly
the forward pass under the cache's mask, tests/models/test_decode.py), with:

* `global`, `full`: every position cached (`FullCache` of multiple x L);
* `global`, `window`: the last W positions only (`RingCache`, the same weights with the kind's
  window set to W at decode time);
* `global`, `window+sinks`: the last W positions and the first `sinks` (`SinkRingCache`,
  `KindSettings(window=W, sinks=n)`): StreamingLLM's cache. Keys keep their absolute positions
  (they are cached after RoPE), where StreamingLLM re-numbers positions inside its cache; so a
  query at position p sees the sink keys at distance p, past anything seen in training;
* `sink_logits`, `window`: the windowed model with its own cache (`RingCache` of W).

Measured per (model, cache, seed): bits per byte of the next-byte predictions by position
(buckets [0, W), [W, L), [L, 2L), ... doubling to multiple x L) and over the whole row, and the
cache bytes per sequence at multiple x L (`models.cache.nbytes` of `init_cache(1, multiple*L)`:
K, V and segment ids of every layer). Expected (StreamingLLM): window-only degrades once the
first tokens are evicted (positions past W), sinks keep it near the full cache at constant
memory; the full cache degrades past L (RoPE positions never trained, row 3).
"""

from __future__ import annotations

import dataclasses
import math
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.configs import text
from experiments.data import tasks
from experiments.evaluation import runs
from experiments.rows import base
from experiments.training import plots
from models import cache as cache_lib

# (model, cache) pairs in the table's order.
VARIANTS = (("global", "full"), ("global", "window"), ("global", "window+sinks"),
            ("sink_logits", "window"))


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What one version of the row runs (`FULL`, `QUICK`)."""
  smoke: bool
  seq_len: int     # training length L
  window: int      # W: the window of the window caches and of the sink_logits model
  sinks: int       # sink tokens of the window+sinks cache
  d_model: int
  num_layers: int
  steps: int
  batch_size: int
  multiple: int    # decoded rows are multiple x L bytes
  rows: int        # held-out rows per (model, cache, seed)
  chunk: int       # bytes per decoding step


FULL = Sizes(smoke=False, seq_len=64, window=16, sinks=4, d_model=64, num_layers=3, steps=400,
             batch_size=16, multiple=16, rows=8, chunk=64)
# Seconds (the suite): one layer, two training steps, rows of 2 L.
QUICK = Sizes(smoke=True, seq_len=32, window=8, sinks=4, d_model=32, num_layers=1, steps=2,
              batch_size=2, multiple=2, rows=1, chunk=32)


def config_for(sizes: Sizes, model: str, seed: int):
  """The training run of `model` ("global" or "sink_logits") at the row's sizes."""
  config = text.get_config("global,smoke" if sizes.smoke else "global")
  config.seed = seed
  config.task.seq_len = sizes.seq_len
  if model == "sink_logits":
    config.model.kinds["global"].update(window=sizes.window, sink=True)
  config.model.update(d_model=sizes.d_model, num_layers=sizes.num_layers, num_heads=4,
                      mlp_dim=2 * sizes.d_model)
  config.update(num_steps=sizes.steps, batch_size=sizes.batch_size, progress=False)
  return base.at_end_only(config)


def cache_kinds(config, sizes: Sizes, cache: str) -> dict:
  """The run's kinds with the decoding cache's window / sinks set on its global kind."""
  kinds = config.model.kinds.to_dict()
  if cache != "full":
    kinds["global"] = dict(kinds["global"], window=sizes.window)
  if cache == "window+sinks":
    kinds["global"]["sinks"] = sizes.sinks
  return kinds


@nnx.jit(static_argnums=3)
def decoded_losses(model, tokens, targets, chunk: int):
  """`[B, T]` next-byte losses (nats) of `tokens` fed `chunk` at a time through the KV cache."""
  b, t = tokens.shape

  def step(cache, pieces):
    x, y = pieces
    logits, aux = model(x, cache=cache)
    return aux["cache"], optax.softmax_cross_entropy_with_integer_labels(logits, y)

  split = lambda a: a.reshape(b, t // chunk, chunk).transpose(1, 0, 2)  # steps B chunk
  _, losses = jax.lax.scan(step, model.init_cache(b, t), (split(tokens), split(targets)))
  return losses.transpose(1, 0, 2).reshape(b, t)


def held_out_rows(task: tasks.Text, length: int, rows: int) -> list[dict[str, np.ndarray]]:
  """The first `rows` held-out rows of `length` bytes that lie inside one file (every target
  scored): long text with no document boundary."""
  found = []
  for i in range(200 * rows):
    batch = task.batch(i, 1, salt=1, seq_len=length)
    if (batch["segment_ids"] == batch["segment_ids"][0, 0]).all() and batch["loss_mask"].all():
      found.append(batch)
      if len(found) == rows:
        return found
  raise ValueError(f"only {len(found)} of {rows} held-out rows of {length} bytes lie inside "
                   f"one file; use shorter rows or a corpus with longer files.")


def buckets(sizes: Sizes) -> list[tuple[int, int]]:
  """Position buckets: [0, W), [W, L), then doubling [L, 2L) .. to multiple x L."""
  edges, top = [0, sizes.window, sizes.seq_len], sizes.multiple * sizes.seq_len
  while edges[-1] < top:
    edges.append(min(2 * edges[-1], top))
  return list(zip(edges[:-1], edges[1:]))


def measure(sizes: Sizes, run_dir: str, cache: str) -> dict:
  """Per-position mean loss over the held-out rows (and the cache bytes) of one variant."""
  config = runs.load_config(run_dir)
  _, model, _ = runs.load_run(run_dir, model_overrides=dict(
      kinds=cache_kinds(config, sizes, cache)))
  length = sizes.multiple * sizes.seq_len
  task = tasks.make_task(config.task, seed=config.seed)
  losses = [np.asarray(decoded_losses(model, jnp.asarray(b["tokens"]), jnp.asarray(b["targets"]),
                                      sizes.chunk))[0] for b in held_out_rows(task, length,
                                                                              sizes.rows)]
  return dict(loss_by_position=np.mean(losses, axis=0).tolist(), rows=len(losses),
              cache_bytes=cache_lib.nbytes(model.init_cache(1, length)))


def variant_records(ctx: base.Context, sizes: Sizes, model: str, cache: str,
                    seed: int) -> list[dict]:
  """Trains (resuming) `model` and measures one cache, cached in the run's workdir: one record
  per position bucket and one over the whole row (`pos_lo` 0, `pos_hi` = the row length)."""
  run_dir = base.train_run(config_for(sizes, model, seed), ctx.path(f"{model}_s{seed}"))
  tag = (f"row9_{cache}_w{sizes.window}_n{sizes.sinks}_{sizes.multiple}x_{sizes.rows}"
         f"_c{sizes.chunk}.json")
  measured = base.cached(os.path.join(run_dir, tag), lambda: measure(sizes, run_dir, cache))
  curve = np.asarray(measured["loss_by_position"])
  spans = buckets(sizes) + [(0, len(curve))]
  return [dict(model=model, cache=cache, seed=seed, pos_lo=lo, pos_hi=hi,
               tokens=(hi - lo) * measured["rows"], loss=float(curve[lo:hi].mean()),
               bits_per_byte=float(curve[lo:hi].mean()) / math.log(2),
               cache_bytes=measured["cache_bytes"]) for lo, hi in spans]


def table(records: list[dict], sizes: Sizes) -> str:
  """Bits per byte by position bucket and over the row (mean (min-max) over seeds), and the
  cache bytes per sequence."""
  length = sizes.multiple * sizes.seq_len
  spans = buckets(sizes) + [(0, length)]
  header = (["model", "cache"] + [f"[{lo}, {hi})" for lo, hi in spans[:-1]]
            + [f"whole row ({length})", f"cache KiB at {length}"])
  rows = []
  for model, cache in VARIANTS:
    mine = [r for r in records if r["model"] == model and r["cache"] == cache]
    cells = [base.cell([r["bits_per_byte"] for r in mine if (r["pos_lo"], r["pos_hi"]) == span],
                       "{:.3f}") for span in spans]
    rows.append([model, cache] + cells + [f"{mine[0]['cache_bytes'] / 1024:.1f}"])
  return base.markdown_table(header, rows)


def plot(records: list[dict], sizes: Sizes, path: str) -> None:
  """Bits per byte against position (the buckets, log x), a line per (model, cache)."""
  fig, ax = plots.figure(figsize=(7, 4))
  spans = buckets(sizes)
  for model, cache in VARIANTS:
    mine = [r for r in records if r["model"] == model and r["cache"] == cache]
    means = [np.mean([r["bits_per_byte"] for r in mine if (r["pos_lo"], r["pos_hi"]) == s])
             for s in spans]
    ax.plot([max(lo, 1) * 1.4 for lo, _ in spans], means, marker="o", markersize=3,
            label=f"{model}, {cache}")
  ax.axvline(sizes.window, color="red", linestyle=":", alpha=0.5)
  ax.axvline(sizes.seq_len, color="gray", linestyle=":")
  ax.set_xscale("log", base=2)
  ax.set_xlabel(f"position of the byte (W = {sizes.window}: red; L = {sizes.seq_len}: gray)")
  ax.set_ylabel("held-out bits per byte, mean over seeds")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  plots.save(fig, path)


def run(ctx: base.Context) -> base.Result:
  sizes = QUICK if ctx.quick else FULL
  seeds = ctx.run_seeds
  records = [r for seed in seeds for model, cache in VARIANTS
             for r in variant_records(ctx, sizes, model, cache, seed)]
  note = (f"Held-out bits per byte by position ({sizes.rows} rows of "
          f"{sizes.multiple * sizes.seq_len} bytes inside one stdlib file per cell and seed, "
          f"decoded {sizes.chunk} bytes per step through the cache), models trained at "
          f"L = {sizes.seq_len} for {sizes.steps} steps of {sizes.batch_size} rows "
          f"(d_model {sizes.d_model}, {sizes.num_layers} layers); window W = {sizes.window}, "
          f"{sizes.sinks} sink tokens; mean (min-max) over seeds {', '.join(map(str, seeds))}.")
  return base.Result(records, f"{note}\n\n{table(records, sizes)}",
                     lambda path: plot(records, sizes, path))


ROW = base.Row(number=9, name="streaming",
               title="Decoding past the training length: full, window, window + sinks caches "
               "and learned sink logits",
               columns=("model", "cache", "seed", "pos_lo", "pos_hi", "tokens", "loss",
                        "bits_per_byte", "cache_bytes"),
               run=run)
