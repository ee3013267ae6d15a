"""Row 3: context extension 1x-16x of a passkey model with ordinary RoPE on every layer.

A decoder trained at length L (`passkey.py:rope`: all layers global, RoPE theta 1e4, so every
position past L is a rotation never seen in training) is evaluated on passkey prompts of
1, 2, 4, 8 and 16 x L with RoPE scaling none / linear (PI) / ntk / yarn (models/rope.py):

* inference only: the trained weights, scale s = the column's multiple (s = 1 at 1x, where
  every method is the unscaled model, evaluated once);
* fine-tuned: a short fine-tune (`Finetune`: steps, length, scale) from the trained weights with
  the method's RoPE (`extend.py`'s recipe; `none` = plain fine-tuning at the longer length) on
  packed documents of every length up to the fine-tune length, evaluated with that RoPE at
  every column.

Every yarn row uses the row's ramp bounds `Sizes.yarn_ramp` = (alpha, beta) unless a
`Finetune` sets its own: the paper's (1, 32) keep 1 of the 16 frequency pairs at L = 256 and
head_dim 32, FULL's (1, 8) keep 3 (`Rope.yarn_regimes`; experiments/results/README.md, row 3).

Exact match of the 5-digit key over `depths` x `examples` prompts per (seed, cell); each cell is
reported as the mean over seeds (min-max) of the per-seed mean over depths. Everything is
resumable: runs checkpoint under `ctx.workdir`, each evaluated cell is cached as JSON.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from experiments.configs import extend, passkey
from experiments.evaluation import runs, scores
from experiments.rows import base

METHODS = extend.METHODS  # none, linear, ntk, yarn
PAPER_RAMP = (1.0, 32.0)  # YaRN's (alpha, beta) for Llama (models/rope.py)


@dataclasses.dataclass(frozen=True)
class Finetune:
  """A fine-tune of `steps` steps of `batch_size` rows at `multiple` x L, RoPE scale `factor`."""
  multiple: int
  factor: float
  steps: int
  batch_size: int
  methods: tuple[str, ...] = METHODS
  lr: float = 1e-3
  seeds: tuple[int, ...] | None = None  # only these of the row's seeds (None: all)
  yarn_ramp: tuple[float, float] | None = None  # None: the row's
  # The share of rows that hold one document as long as the row, needle at a uniform depth
  # (needle distances uniform up to the fine-tune length), instead of packed documents of
  # every length (`tasks.Haystack.whole_rows`; 1: every row, unpacked).
  whole_rows: float = 0.0

  @property
  def name(self) -> str:
    """Its stage in the records (a ramp set here is part of it)."""
    lr = "" if self.lr == 1e-3 else f"_lr{self.lr:g}"
    whole = {0: "", 1: "_whole"}.get(self.whole_rows, f"_whole{self.whole_rows:g}")
    ramp = ramp_tag(self.yarn_ramp) if self.yarn_ramp else ""
    return f"ft{self.multiple}x_s{self.factor:g}_{self.steps}x{self.batch_size}{lr}{whole}{ramp}"

  def run_name(self, method: str, ramp: tuple[float, float], seed: int) -> str:
    """Its run's directory for `method`, given the ramp in force (named if not the paper's)."""
    tag = ramp_tag(ramp) if method == "yarn" and tuple(ramp) != PAPER_RAMP else ""
    return f"{self.name.split('_ramp')[0]}_{method}{tag}_s{seed}"

  @property
  def label(self) -> str:
    seeds = f" (seed {','.join(map(str, self.seeds))} only)" if self.seeds else ""
    lr = "" if self.lr == 1e-3 else f", lr {self.lr:g}"
    ramp = f", ramp {self.yarn_ramp[0]:g}-{self.yarn_ramp[1]:g}" if self.yarn_ramp else ""
    whole = ({0: "", 1: ", one whole-row document per row"}.get(
        self.whole_rows, f", {self.whole_rows:.0%} of rows one whole-row document"))
    return (f"fine-tuned {self.steps} steps of {self.batch_size} at {self.multiple}x, "
            f"s={self.factor:g}{lr}{whole}{ramp}{seeds}")


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What one version of the row runs (`FULL`, `QUICK`)."""
  variant: str            # passkey.py variant of the trained model
  seq_len: int            # training length L
  steps: int              # training steps
  batch_size: int         # training rows per step
  multiples: tuple[int, ...]
  depths: tuple[float, ...]
  examples: int           # prompts per (length, depth) cell and seed
  eval_batch: int
  finetunes: tuple[Finetune, ...]  # the first: every method; then yarn only (`seeds`: attempts)
  methods: tuple[str, ...] = METHODS  # inference-only rows
  yarn_ramp: tuple[float, float] = PAPER_RAMP  # YaRN's (alpha, beta) in every yarn row


FULL = Sizes(variant="rope", seq_len=256, steps=1000, batch_size=16, multiples=(1, 2, 4, 8, 16),
             depths=(0.0, 0.25, 0.5, 0.75, 1.0), examples=4, eval_batch=4, yarn_ramp=(1.0, 8.0),
             finetunes=(Finetune(multiple=2, factor=16, steps=200, batch_size=4, lr=3e-3),
                        Finetune(multiple=4, factor=16, steps=200, batch_size=4, lr=3e-3,
                                 methods=("yarn",)),
                        Finetune(multiple=8, factor=16, steps=200, batch_size=4, lr=3e-3,
                                 methods=("yarn",)),
                        Finetune(multiple=16, factor=16, steps=200, batch_size=4, lr=3e-3,
                                 methods=("yarn",)),
                        # Attempts (experiments/results/README.md, row 3, one-seed probes, yarn): the first recipe
                        # (4x, lr 1e-3, paper ramp); 8 rows at 2x with each ramp; 2 rows at 8x.
                        Finetune(multiple=4, factor=16, steps=200, batch_size=4,
                                 methods=("yarn",), seeds=(0,), yarn_ramp=PAPER_RAMP),
                        Finetune(multiple=2, factor=16, steps=200, batch_size=8, lr=3e-3,
                                 methods=("yarn",), seeds=(0,), yarn_ramp=PAPER_RAMP),
                        Finetune(multiple=2, factor=16, steps=200, batch_size=8, lr=3e-3,
                                 methods=("yarn",), seeds=(0,)),
                        Finetune(multiple=8, factor=16, steps=200, batch_size=2, lr=3e-3,
                                 methods=("yarn",), seeds=(0,)),
                        # 16x with whole-row documents (needles up to 4096 tokens back), in
                        # every row, then in half the rows (the rest packed as before).
                        Finetune(multiple=16, factor=16, steps=200, batch_size=4, lr=3e-3,
                                 methods=("yarn",), seeds=(0,), whole_rows=1),
                        Finetune(multiple=16, factor=16, steps=200, batch_size=4, lr=3e-3,
                                 methods=("yarn",), seeds=(0,), whole_rows=0.5)))
# Seconds (the suite): compiles dominate, so few runs (one fine-tune) and shapes (one length).
QUICK = Sizes(variant="rope,smoke", seq_len=128, steps=4, batch_size=4, multiples=(2,),
              depths=(0.5,), examples=2, eval_batch=2,
              finetunes=(Finetune(multiple=2, factor=2, steps=2, batch_size=2,
                                  methods=("yarn",), seeds=(0,)),), methods=("none", "yarn"))


def base_config(sizes: Sizes, seed: int):
  """The trained model's config (`passkey.py:<variant>` at length L, seed `seed`)."""
  config = passkey.get_config(sizes.variant)
  config.seed = seed
  config.task.seq_len = sizes.seq_len
  config.update(num_steps=sizes.steps, batch_size=sizes.batch_size, eval_after_train=False,
                progress=False)
  return base.at_end_only(config) if "smoke" in sizes.variant else config


def finetune_config(sizes: Sizes, ft: Finetune, method: str, seed: int, source: str):
  """`extend.py`'s recipe from run `source`, at `ft.multiple` x L: packed documents of every
  length up to the new one (the variant's `min_len`, `stretch=False`), or with
  `ft.whole_rows` one document per row, the row's length, its needle at a uniform depth."""
  config = extend.extend(base_config(sizes, seed), method, multiple=ft.multiple,
                         factor=ft.factor)
  config.model.update(ramp_fields(ft.yarn_ramp or sizes.yarn_ramp) if method == "yarn" else {})
  config.init_from = source
  if ft.whole_rows == 1:
    config.task.min_len = 0  # tasks.Haystack: unpacked rows, one document at a uniform depth
  elif ft.whole_rows:
    config.task.whole_rows = float(ft.whole_rows)
  config.update(num_steps=ft.steps, batch_size=ft.batch_size, eval_every=0, eval_batches=1,
                checkpoint_every=ft.steps, log_every=max(1, ft.steps // 10))
  config.optim.update(lr=ft.lr, warmup_steps=max(1, ft.steps // 10))
  return config


def ramp_tag(ramp: tuple[float, float]) -> str:
  return f"_ramp{ramp[0]:g}-{ramp[1]:g}"


def ramp_fields(ramp: tuple[float, float]) -> dict[str, float]:
  """The model config fields of YaRN ramp bounds (alpha, beta)."""
  return dict(rope_yarn_alpha=float(ramp[0]), rope_yarn_beta=float(ramp[1]))


def accuracy(sizes: Sizes, run_dir: str, method: str | None, factor: float | None,
             length: int) -> list[float]:
  """Exact match per depth of run `run_dir` at `length` (RoPE override `method` x `factor`
  with the row's YaRN ramp, None = as trained); cached in the run's directory."""
  ramp = sizes.yarn_ramp if method == "yarn" else None

  def compute():
    config, model, _ = runs.load_run(run_dir, method, factor,
                                         ramp_fields(ramp) if ramp else None)
    rows = scores.grid(model, config, "passkey", [length], sizes.depths, sizes.examples,
                         sizes.eval_batch)
    return [r["accuracy"] for r in rows]

  ramp_part = ramp_tag(ramp) if ramp and tuple(ramp) != PAPER_RAMP else ""
  tag = (f"{method or 'trained'}{factor or ''}{ramp_part}_{length}_n{sizes.examples}x"
         f"{len(sizes.depths)}")
  return base.cached(os.path.join(run_dir, f"row3_{tag}.json"), compute)


def seed_records(ctx: base.Context, sizes: Sizes, seed: int) -> list[dict]:
  """Trains seed `seed`'s model and fine-tunes; every (stage, method, length, depth) record."""
  source = base.train_run(base_config(sizes, seed), ctx.path(f"base_s{seed}"))
  records = []

  def add(stage, method, factor, run_dir, override):
    for multiple in sizes.multiples:
      length = multiple * sizes.seq_len
      f = factor if factor is not None else float(multiple)
      if override and (method == "none" or f == 1.0):  # s = 1: the unscaled model
        cells = accuracy(sizes, run_dir, "none", 1.0, length)
      else:
        cells = accuracy(sizes, run_dir, method if override else None,
                          f if override else None, length)
      for depth, acc in zip(sizes.depths, cells):
        records.append(dict(stage=stage, method=method, factor=1.0 if method == "none" else f,
                            seed=seed, length=length, multiple=multiple, depth=depth,
                            examples=sizes.examples, accuracy=acc))

  for method in sizes.methods:
    add("inference", method, None, source, override=True)
  for ft in sizes.finetunes:
    for method in ft.methods if ft.seeds is None or seed in ft.seeds else ():
      run_dir = base.train_run(finetune_config(sizes, ft, method, seed, source),
                               ctx.path(ft.run_name(method, ft.yarn_ramp or sizes.yarn_ramp,
                                                    seed)))
      add(ft.name, method, ft.factor, run_dir, override=False)
  return records


def summarise(records: list[dict], sizes: Sizes) -> tuple[list[str], list[list[float]],
                                                               list[list[list[float]]]]:
  """(row labels, multiples, per-seed means over depths [row][column][seed])."""
  stages = ["inference"] + [ft.name for ft in sizes.finetunes]
  labels = {ft.name: ft.label for ft in sizes.finetunes}
  labels["inference"] = "inference only, s = column"
  names, values = [], []
  for stage in stages:
    for method in METHODS:
      mine = [r for r in records if r["stage"] == stage and r["method"] == method]
      if not mine:
        continue
      label = labels[stage]
      if method == "none":  # plain fine-tuning: no scale
        label = re.sub(r", s=[0-9.]+", "", label)
      names.append(f"{method}, {label}")
      row = []
      for multiple in sizes.multiples:
        per_seed = {}
        for r in mine:
          if r["multiple"] == multiple:
            per_seed.setdefault(r["seed"], []).append(r["accuracy"])
        row.append([float(np.mean(v)) for _, v in sorted(per_seed.items())])
      values.append(row)
  return names, list(sizes.multiples), values


def on_every_seed(values, num_seeds: int) -> list[bool]:
  """Per grid row: was it run on all `num_seeds` seeds (a result), or fewer (an attempt)?"""
  return [all(len(c) == num_seeds for c in row) for row in values]


def plot(names, multiples, values, seq_len: int, num_seeds: int, path: str) -> None:
  """The grid's rows run on every seed as a heatmap: rows (method, stage), columns length,
  mean over seeds (the one-seed attempts are listed in the markdown, not drawn)."""
  every = on_every_seed(values, num_seeds)
  names = [n for n, e in zip(names, every) if e]
  values = [row for row, e in zip(values, every) if e]
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  image = np.array([[np.mean(c) for c in row] for row in values])
  fig, ax = plt.subplots(figsize=(1.1 * len(multiples) + 4.5, 0.4 * len(names) + 1.6))
  im = ax.imshow(image, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
  for i in range(image.shape[0]):
    for j in range(image.shape[1]):
      ax.text(j, i, f"{image[i, j]:.2f}", ha="center", va="center", fontsize=8)
  ax.set_xticks(range(len(multiples)), [f"{m}x\n{m * seq_len}" for m in multiples])
  ax.set_yticks(range(len(names)), names, fontsize=8)
  ax.set_xlabel("passkey context length (x training length)")
  ax.set_title(f"Passkey exact match, trained at {seq_len} (mean over seeds)", fontsize=9)
  fig.colorbar(im, ax=ax, label="exact match")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def markdown(names, multiples, values, seq_len: int, num_seeds: int) -> str:
  """The table of the rows run on all `num_seeds` seeds; the rows run on fewer (one-seed
  attempts, whose cells past 1x are noise) as a list below it, one value per column."""
  header = ["RoPE scaling"] + [f"{m}x ({m * seq_len})" for m in multiples]
  every = on_every_seed(values, num_seeds)
  table = base.markdown_table(header, [[n] + [base.cell(c) for c in row]
                                       for n, row, e in zip(names, values, every) if e])
  attempts = [f"- {n}: " + " / ".join(base.cell(c) for c in row)
              for n, row, e in zip(names, values, every) if not e]
  if not attempts:
    return table
  columns = f"{multiples[0]}x-{multiples[-1]}x" if len(multiples) > 1 else f"{multiples[0]}x"
  return "\n".join([table, "", f"Attempts on fewer seeds (exact match at {columns}):", "",
                    *attempts])


def run(ctx: base.Context) -> base.Result:
  sizes = QUICK if ctx.quick else FULL
  records = [r for seed in ctx.seeds for r in seed_records(ctx, sizes, seed)]
  names, multiples, values = summarise(records, sizes)
  note = (f"Passkey exact match, mean over {len(sizes.depths)} depths x {sizes.examples} "
          f"prompts per seed; mean (min-max) over seeds {', '.join(map(str, ctx.seeds))}. "
          f"Trained at L = {sizes.seq_len} ({sizes.steps} steps of {sizes.batch_size} rows). "
          f"YaRN ramp (alpha, beta) = ({sizes.yarn_ramp[0]:g}, {sizes.yarn_ramp[1]:g}) unless "
          f"a row names its own.")
  text = f"{note}\n\n{markdown(names, multiples, values, sizes.seq_len, len(ctx.seeds))}"
  return base.Result(records, text,
                     lambda path: plot(names, multiples, values, sizes.seq_len,
                                       len(ctx.seeds), path))


ROW = base.Row(number=3, name="extension", title="Context extension 1x-16x (passkey, RoPE "
               "scaling)", columns=("stage", "method", "factor", "seed", "length", "multiple",
                                    "depth", "examples", "accuracy"), run=run)
