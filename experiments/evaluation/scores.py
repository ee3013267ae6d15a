"""Scoring a trained model: haystack grids, MLM needles by distance, DSA indexer recall.

    rows = grid(model, config, "passkey", lengths=[256, 512], depths=[0.0, 0.5, 1.0],
                examples=8, batch_size=8)   # one row per (length, depth)

Every function takes a built model and the run's config (the task's text settings come from
`config.task`), scores with `trainer.evaluate_batches` (one forward pass scores a whole batch:
exact match of the answer tokens) and returns plain dict rows; `report.py` turns them into
tables, CSV and plots. Held-out prompts use other RNG salts than training (salt 2; 3 for the
KV-cache cross-check).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import models
from models import dsa
from experiments.data import mlm as mlm_data
from experiments.data import tasks
from experiments.training import trainer


def haystack(config: ml_collections.ConfigDict, name: str) -> tasks.Haystack:
  """The haystack task `name` with the training task's text settings (filler, instruction)."""
  known = {f.name for f in dataclasses.fields(tasks.Haystack)}
  fields = {k: v for k, v in config.task.to_dict().items() if k in known and k != "seq_len"}
  return tasks.Haystack(**dict(fields, kind=name, seed=config.seed + 1))


def grid(model, config: ml_collections.ConfigDict, name: str, lengths: Sequence[int],
         depths: Sequence[float], examples: int, batch_size: int) -> list[dict[str, Any]]:
  """One row per (length, depth): exact-match and token accuracy of the greedy answers."""
  task = haystack(config, name)
  rows = []
  for length in lengths:
    for depth in depths:
      batches = [task.batch(i, min(batch_size, examples - i * batch_size), seq_len=length,
                            depth=depth, salt=2)
                 for i in range(-(-examples // batch_size))]
      scores = trainer.evaluate_batches(model, batches)
      rows.append(dict(task=name, length=int(length), depth=float(depth), examples=examples,
                       accuracy=scores["accuracy"], token_accuracy=scores["token_accuracy"]))
  return rows


def needle_by_distance(model, config: ml_collections.ConfigDict, lengths: Sequence[int],
                       examples: int, batch_size: int) -> list[dict[str, Any]]:
  """MLM models: one row per (length, distance bucket) with the exact match (every digit) and
  digit accuracy of the masked needle value, its intact copy `distance` tokens away (before or
  after; `mlm_data.MLM.needle_batch`, held-out text). Buckets: `mlm_data.distance_buckets`."""
  task = tasks.make_task(config.task, seed=config.seed + 1)
  rows = []
  for length in lengths:
    for lo, hi in mlm_data.distance_buckets(length, task.needle_len):
      batches = [task.needle_batch(i, min(batch_size, examples - i * batch_size),
                                   seq_len=length, distance=(lo, hi))
                 for i in range(-(-examples // batch_size))]
      scores = trainer.evaluate_batches(model, batches)
      rows.append(dict(task="mlm_needle", length=int(length), distance_lo=lo, distance_hi=hi,
                       examples=examples, accuracy=scores["accuracy"],
                       token_accuracy=scores["token_accuracy"]))
  return rows


@nnx.jit
def _layer_recalls(model, batch):
  _, aux = model(batch["tokens"], segment_ids=batch["segment_ids"])
  return [layer.get("indexer_recall") for layer in aux["layers"]]


def indexer_recall(model, config: ml_collections.ConfigDict, name: str, length: int,
                   depths: Sequence[float], examples: int, batch_size: int
                   ) -> list[dict[str, Any]]:
  """DSA models: per layer, the share of dense attention mass on the indexer's top-k keys.

  Averaged over the queries of `examples` prompts per depth of task `name` at `length`
  (`models.dsa` option `recall`); one row per DSA layer. Empty for models without DSA layers.
  """
  task = haystack(config, name)
  batches = (task.batch(i, min(batch_size, examples - i * batch_size), seq_len=length,
                        depth=depth, salt=2)
             for depth in depths for i in range(-(-examples // batch_size)))
  return [dict(task=name, length=int(length), **r) for r in batch_recall(model, batches)]


def batch_recall(model, batches: Iterable[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
  """`indexer_recall` over any task's `batches` (token rows `[B, T]`): per DSA layer, the
  dense attention mass on the indexer's top-k keys, averaged over queries and rows (rows
  weighted equally). Empty for models without DSA layers."""
  if not dsa.set_recall(model, True):
    return []
  try:
    sums = {}
    for batch in batches:
      rows = len(batch["tokens"])
      values = jax.device_get(_layer_recalls(model, trainer.to_device(batch)))
      for layer, value in enumerate(values):
        if value is not None:
          total, count = sums.get(layer, (0.0, 0))
          sums[layer] = (total + float(value) * rows, count + rows)
  finally:
    dsa.set_recall(model, False)
  return [dict(layer=layer, recall=total / count) for layer, (total, count) in sorted(sums.items())]


def check_generate(model, config: ml_collections.ConfigDict, name: str, length: int,
                   rows: int) -> float:
  """Fraction of `rows` prompts where KV-cache greedy decoding agrees with `eval_step`."""
  task = haystack(config, name)
  batch = task.batch(0, rows, seq_len=length, depth=0.5, salt=3)
  answer_len = int(batch["loss_mask"][0].sum())
  prompt = batch["tokens"][:, :length - answer_len + 1]  # up to the token before the answer
  out = np.asarray(models.generate(model, jnp.asarray(prompt), answer_len))
  generated = np.all(out[:, -answer_len:] == batch["tokens"][:, -answer_len:], axis=1)
  teacher = np.asarray(jax.device_get(trainer.eval_step(model, trainer.to_device(batch)))["exact"])
  return float(np.mean(generated == teacher))
