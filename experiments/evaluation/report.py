r"""Evaluate a trained run: passkey / needle accuracy over (context length x depth); for an
MLM encoder (experiments/configs/mlm.py) the masked needle's accuracy by distance.

    python -m experiments.evaluate --workdir=/tmp/longctx_passkey --rope_scaling=yarn \
        --rope_factor=4
    python -m experiments.evaluate --workdir=/tmp/longctx_passkey --tasks=passkey,needle \
        --length_multiples=1,2,4,8 --tag=long

Loads `config.json` and the latest checkpoint of `--workdir`, optionally overrides the RoPE
scaling (inference-time context extension: PI `linear`, `ntk`, `yarn`), and scores the greedy
answer of `--examples` prompts per cell by exact match. Lengths are multiples of the training
length (or `--lengths`, absolute). Writes `eval_<task>_<tag>.csv` and a heatmap PNG next to
the run (or under `--outdir`) and prints the accuracy table (rows: depth, columns: length).

Never overwrites: without `--tag` the name says what was evaluated (`default_tag`: RoPE
scaling and factor, lengths, `--examples`: e.g. `eval_passkey_yarn4_256-512-768-1024.csv`), so
it cannot replace the training run's own `eval_passkey.csv`; an existing file of that name is
refused unless `--overwrite`. Holds the workdir's shared lock (experiments/workdir.py): it may
run next to another evaluation, not next to a training run writing the same workdir.

An MLM run's task is `mlm_needle` (`eval_mlm_needle[_<tag>].csv/.png`): exact match of a
masked key-value needle's value by the distance to its intact copy, in doubling buckets.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from typing import Any, Iterable, Sequence

from absl import app, flags, logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import models
from models import dsa
from experiments import checkpoints as ckpt_lib
from experiments import cli, mlm_task, plots, tasks, trainer
from experiments import workdir as workdir_lib

FLAGS = flags.FLAGS


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
  after; `mlm_task.MLM.needle_batch`, held-out text). Buckets: `mlm_task.distance_buckets`."""
  task = tasks.make_task(config.task, seed=config.seed + 1)
  rows = []
  for length in lengths:
    for lo, hi in mlm_task.distance_buckets(length, task.needle_len):
      batches = [task.needle_batch(i, min(batch_size, examples - i * batch_size),
                                   seq_len=length, distance=(lo, hi))
                 for i in range(-(-examples // batch_size))]
      scores = trainer.evaluate_batches(model, batches)
      rows.append(dict(task="mlm_needle", length=int(length), distance_lo=lo, distance_hi=hi,
                       examples=examples, accuracy=scores["accuracy"],
                       token_accuracy=scores["token_accuracy"]))
  return rows


def format_distance_table(rows: list[dict[str, Any]]) -> str:
  """Markdown table of `needle_by_distance` rows: one row per (length, distance bucket)."""
  lines = ["| length | distance | exact match | digit accuracy |", "|---|---|---|---|"]
  lines += [f"| {r['length']} | [{r['distance_lo']}, {r['distance_hi']}) | {r['accuracy']:.2f} "
            f"| {r['token_accuracy']:.2f} |" for r in rows]
  return "\n".join(lines)


def plot_distance(rows: list[dict[str, Any]], path: str, title: str, window: int) -> None:
  """Needle exact match against distance (bucket midpoints), one line per context length;
  the dotted line marks one local layer's reach (`window // 2` each side; 0 = none)."""
  fig, ax = plots.figure(figsize=(6, 4))
  for length in sorted({r["length"] for r in rows}):
    points = [((r["distance_lo"] + r["distance_hi"]) / 2, r["accuracy"]) for r in rows
              if r["length"] == length]
    ax.plot(*zip(*points), marker="o", label=f"context {length}")
  if window:
    ax.axvline(window // 2, color="gray", linestyle=":", label=f"local reach {window // 2}")
  ax.set_xscale("log", base=2)
  plots.label(ax, xlabel="distance between the masked value and its key (tokens)",
              ylabel="exact match (all digits)", title=title, ylim=(-0.02, 1.02))
  plots.save(fig, path)


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


def format_table(rows: list[dict[str, Any]]) -> str:
  """Markdown table: one row per depth plus the mean, one column per length."""
  lengths = sorted({r["length"] for r in rows})
  depths = sorted({r["depth"] for r in rows})
  cell = {(r["length"], r["depth"]): r["accuracy"] for r in rows}
  lines = [f"| {rows[0]['task']} depth \\ length | " + " | ".join(map(str, lengths)) + " |",
           "|---" * (len(lengths) + 1) + "|"]
  for depth in depths:
    lines.append(f"| {depth:.2f} | " + " | ".join(f"{cell[l, depth]:.2f}" for l in lengths) + " |")
  means = [np.mean([cell[l, d] for d in depths]) for l in lengths]
  lines.append("| **mean** | " + " | ".join(f"**{m:.2f}**" for m in means) + " |")
  return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def plot_heatmap(rows: list[dict[str, Any]], path: str, title: str) -> None:
  """Accuracy over (context length x depth), the standard needle-in-a-haystack picture."""
  lengths = sorted({r["length"] for r in rows})
  depths = sorted({r["depth"] for r in rows})
  cell = {(r["length"], r["depth"]): r["accuracy"] for r in rows}
  image = np.array([[cell[l, d] for l in lengths] for d in depths])
  fig, ax = plots.figure(figsize=(1.2 * len(lengths) + 2, 0.5 * len(depths) + 2))
  im = ax.imshow(image, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
  for i in range(len(depths)):
    for j in range(len(lengths)):  # white on dark cells, black on light ones
      r, g, b, _ = im.cmap(im.norm(image[i, j]))
      dark = 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5
      ax.text(j, i, f"{image[i, j]:.2f}", ha="center", va="center", fontsize=8,
              color="white" if dark else "black")
  ax.set_xticks(range(len(lengths)), [str(l) for l in lengths])
  ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("needle depth")
  ax.set_title(title)
  fig.colorbar(im, ax=ax, label="exact-match accuracy")
  plots.save(fig, path)


def check_outputs(outdir: str, task_names: Sequence[str], tag: str, overwrite: bool) -> None:
  """Raises `FileExistsError` if an output `eval_<task>[_<tag>].csv/.png` exists (unless
  `overwrite`): evaluations never replace a result silently."""
  suffix = f"_{tag}" if tag else ""
  outputs = [os.path.join(outdir, f"eval_{n}{suffix}{x}") for n in task_names
             for x in (".csv", ".png")]
  existing = [p for p in outputs if os.path.exists(p)]
  if existing and not overwrite:
    raise FileExistsError(f"{', '.join(existing)} already exist(s); pass another --tag, or "
                          f"--overwrite to replace them.")


def evaluate_and_report(model, config: ml_collections.ConfigDict, outdir: str, *,
                        task_names=None, lengths=None, depths=None, examples=None,
                        tag: str = "", overwrite: bool = False) -> dict[str, list[dict[str, Any]]]:
  """Runs the grid for each task, writes CSV + heatmap under `outdir`, prints the tables.

  Files are `eval_<task>[_<tag>].csv/.png` (and `eval_dsa_recall[_<tag>].csv`); if one exists
  and not `overwrite`, raises `FileExistsError` before evaluating anything.
  """
  e = config.eval
  train_len = config.task.seq_len
  lengths = lengths or [m * train_len for m in e.length_multiples]
  depths = depths or list(e.depths)
  suffix = f"_{tag}" if tag else ""
  names = list(task_names or e.tasks)
  check_outputs(outdir, names, tag, overwrite)
  results = {}
  for name in names:
    stem = os.path.join(outdir, f"eval_{name}{suffix}")
    rope = f"rope={model.config.rope_scaling}" + (
        f" x{model.config.rope_factor:g}" if model.config.rope_scaling != "none" else "")
    if name == "mlm_needle":
      rows = needle_by_distance(model, config, lengths, examples or e.examples, e.batch_size)
      write_csv(rows, stem + ".csv")
      kinds = "/".join(model.config.layer_pattern)
      plot_distance(rows, stem + ".png", f"MLM needle ({kinds}), trained at {train_len}",
                    model.config.kind_settings("local").window if "local" in kinds else 0)
      print(f"\nMLM needle retrieval by distance ({kinds}; trained at {train_len}; {rope}):")
      print(format_distance_table(rows), flush=True)
      results[name] = rows
      continue
    rows = grid(model, config, name, lengths, depths, examples or e.examples, e.batch_size)
    write_csv(rows, stem + ".csv")
    plot_heatmap(rows, stem + ".png", f"{name}: trained at {train_len}, {rope}")
    print(f"\n{name} exact-match accuracy (trained at length {train_len}; {rope}):")
    print(format_table(rows), flush=True)
    results[name] = rows
  recall = indexer_recall(model, config, (task_names or e.tasks)[0], train_len, depths,
                          examples or e.examples, e.batch_size)
  if recall:
    write_csv(recall, os.path.join(outdir, f"eval_dsa_recall{suffix}.csv"))
    print(f"\nDSA indexer recall at length {train_len} (dense attention mass on the top-k keys):")
    print("  " + "  ".join(f"layer {r['layer']}: {r['recall']:.3f}" for r in recall), flush=True)
    results["dsa_recall"] = recall
  return results


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run saved in `<workdir>/config.json`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a training run's workdir.")
  with open(path) as f:
    data = json.load(f)
  data.pop("resolved", None)  # written for readers by train.write_config
  return ml_collections.ConfigDict(data)


def load_run(workdir: str, rope_scaling: str | None = None, rope_factor: float | None = None,
             model_overrides: dict[str, Any] | None = None
             ) -> tuple[ml_collections.ConfigDict, Any, int]:
  """(config, model with the latest checkpoint's weights, step) of a training run.

  `rope_scaling`/`rope_factor` override the trained RoPE (inference-time context extension);
  the original length L of `yarn` is the training length unless the run already had one.
  `model_overrides` sets other parameter-free `ModelConfig` fields (e.g. `rope_yarn_beta`).
  """
  config = load_config(workdir)
  overrides = dict(model_overrides or {})
  if rope_scaling is not None or rope_factor is not None:
    overrides.update(rope_scaling=rope_scaling or config.model.rope_scaling,
                     rope_factor=float(rope_factor or config.model.rope_factor),
                     rope_original_length=(config.model.rope_original_length
                                           or config.task.seq_len))
  model = trainer.make_model(config, **overrides)
  step = ckpt_lib.load_params(model, workdir)
  return config, model, step


def default_tag(rope_scaling: str | None, rope_factor: float | None, lengths: Sequence[int],
                examples: int | None) -> str:
  """What an evaluation computed, as a file-name part: `yarn4_256-512-1024_n8` (`trained`:
  the run's own RoPE)."""
  rope = f"{rope_scaling or 'trained'}{f'{rope_factor:g}' if rope_factor else ''}"
  return f"{rope}_{'-'.join(map(str, lengths))}" + (f"_n{examples}" if examples else "")


def run(workdir: str, *, outdir: str | None = None, task_names: Sequence[str] | None = None,
        length_multiples: Sequence[float] | None = None, lengths: Sequence[int] | None = None,
        depths: Sequence[float] | None = None, examples: int | None = None,
        rope_scaling: str | None = None, rope_factor: float | None = None, tag: str = "",
        overwrite: bool = False, check_rows: int = 4) -> dict[str, list[dict[str, Any]]]:
  """Evaluates run `workdir` (under its shared lock); what `main` does with the flags."""
  workdir = os.path.abspath(workdir)
  with workdir_lib.lock(workdir, shared=True):
    config = load_config(workdir)
    train_len = config.task.seq_len
    multiples = length_multiples or config.eval.length_multiples
    lengths = [int(x) for x in lengths or [float(m) * train_len for m in multiples]]
    names = list(task_names or config.eval.tasks)
    tag = tag or default_tag(rope_scaling, rope_factor, lengths, examples)
    outdir = outdir or workdir
    check_outputs(outdir, names, tag, overwrite)  # before the model is built
    config, model, step = load_run(workdir, rope_scaling, rope_factor)
    logging.info("Loaded %s at step %d.", workdir, step)
    os.makedirs(outdir, exist_ok=True)
    if check_rows and config.model.causal:  # KV-cache decoding: decoders only
      agree = check_generate(model, config, names[0], train_len, check_rows)
      print(f"KV-cache greedy decoding agrees with teacher-forced scoring on {agree:.0%} of "
            f"rows.")
    return evaluate_and_report(model, config, outdir, task_names=names, lengths=lengths,
                               depths=[float(d) for d in depths] if depths else None,
                               examples=examples, tag=tag, overwrite=overwrite)


def main(argv):
  del argv
  try:
    run(FLAGS.workdir, outdir=FLAGS.outdir, task_names=FLAGS.tasks,
        length_multiples=FLAGS.length_multiples, lengths=FLAGS.lengths, depths=FLAGS.depths,
        examples=FLAGS.examples, rope_scaling=FLAGS.rope_scaling, rope_factor=FLAGS.rope_factor,
        tag=FLAGS.tag, overwrite=FLAGS.overwrite, check_rows=FLAGS.check_generate)
  except (FileExistsError, FileNotFoundError, workdir_lib.WorkdirError,
          ckpt_lib.CheckpointError, ValueError) as e:
    sys.exit(f"error: {e}")


def define_flags() -> None:
  """The command-line flags (defined when run as a script, so train.py can import us)."""
  flags.DEFINE_string("workdir", None, "A training run's workdir (config.json + checkpoints).")
  flags.DEFINE_string("outdir", None, "Where CSV/PNG go (default: --workdir).")
  flags.DEFINE_list("tasks", None, "Haystack tasks: passkey, needle; mlm_needle for MLM runs (default: "
                    "config.eval).")
  flags.DEFINE_list("length_multiples", None, "Lengths as multiples of the training length.")
  flags.DEFINE_list("lengths", None, "Absolute context lengths (overrides multiples).")
  flags.DEFINE_list("depths", None, "Needle depths in [0, 1].")
  flags.DEFINE_integer("examples", None, "Prompts per (length, depth) cell.")
  flags.DEFINE_string("rope_scaling", None, "Override: none, linear, ntk, yarn.")
  flags.DEFINE_float("rope_factor", None, "Override: scale s = L'/L.")
  flags.DEFINE_string("tag", "", "Output names eval_<task>_<tag>.* (default: what was "
                      "evaluated, e.g. yarn4_256-512-768-1024).")
  flags.DEFINE_bool("overwrite", False, "Replace existing output files of the same name.")
  flags.DEFINE_integer("check_generate", 4, "Rows cross-checked with KV-cache decoding.")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main, flags_parser=cli.parse_flags)
