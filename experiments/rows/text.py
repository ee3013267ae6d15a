"""Row 5: real text. Does a byte-level decoder use its context, and past its training length?

Decoders that differ only in their layers (the same sizes, steps, data and seed) train on the
Python standard library's sources with every 10th file (sorted order) held out:

* `global`: every layer global (`text.py:global`); `local`: every layer local (`text.py:local`);
* `alternating`: ModernBERT's pattern, global, local, local, global, trained as `text.py:dsa`'s
  dense stage: its global layers are DSA layers in stage "dense", which attend to every key
  with flash attention (the function a global layer computes, with the global RoPE), while a
  lightning indexer (parameters of its own, unused by the forward pass) learns its KL to that
  attention from a detached input. The two meet only in the optimizer's global-norm clip (its
  gradient norm counts the indexer's too). So this is the alternating model (one run serves
  both, as rows 2 and 4's dense models), and its checkpoint at `steps - sparse_steps` is
  DeepSeek's dense warm-up for:
* `dsa`: DeepSeek's stage 2 from that checkpoint (`rows.dsa.chain_stage`, as rows 2 and 4):
  each query of the two DSA layers attends to its indexer's top_k = L/8 keys, for the last
  `sparse_steps` steps: the same total steps as every other model.

On held-out rows of 1x, 2x and 4x the training length L, each token's loss is bucketed by the
context it had: its position in its file within the row, plus one (buckets [1, 2), [2, 4), ...
doubling, the last one [length/2, length]; a row starting mid-file truncates the context at
the row start). Past L the models run as trained (`none`) and with YaRN at s = length / L.
Bits per byte = mean loss / ln 2 over a length's scored tokens.

Different buckets hold different tokens (a file's first bytes are unlike its later ones), so
the row also measures context use on the same tokens (the ablation of Khandelwal et al. 2018,
"Sharp nearby, fuzzy far away"): every 1x row that lies inside one file has its last `scored`
bytes scored given only the row's last c bytes, c in `cuts`, and given the whole row; what
those bytes lose when the context is cut to c is what the model gets from the bytes beyond.

Also per model and length: attention FLOPs per token against all-global (`models.flops`; DSA:
top_k keys plus the indexer's scores) and, with DSA layers, the indexer recall (the dense
attention mass on its top-k keys; `scores.batch_recall`).

Expected (the question this row asks): loss falls with position for global and alternating, and stops falling past
the window for local-only; without scaling the global models degrade past L.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

from flax import nnx
import jax
import numpy as np
import optax

from experiments.data import tasks
from experiments.evaluation import runs, scores
from experiments.training import plots, trainer
from experiments.configs import text
from experiments.rows import base, dsa

PATTERNS = ("global", "local", "alternating", "dsa")  # in training order: dsa needs alternating


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What one version of the row runs (`FULL`, `QUICK`)."""
  smoke: bool
  seq_len: int
  d_model: int
  num_layers: int
  window: int
  steps: int
  batch_size: int
  multiples: tuple[int, ...]
  eval_tokens: int   # held-out tokens per (model, length, RoPE): rows = eval_tokens / length
  sparse_steps: int  # dsa: the last steps of `steps` run sparse (DeepSeek's stage 2)
  scored: int  # context ablation: the bytes scored at the end of each row
  cuts: tuple[int, ...]  # context ablation: the contexts (bytes) given besides the whole row
  patterns: tuple[str, ...] = PATTERNS

  def __post_init__(self):
    if self.multiples[0] != 1 or not 0 < self.scored <= min(self.cuts) or max(
        self.cuts) >= self.seq_len:
      raise ValueError(f"Sizes: need multiples starting at 1 (got {self.multiples}) and "
                       f"0 < scored={self.scored} <= cuts {self.cuts} < seq_len={self.seq_len}.")


FULL = Sizes(smoke=False, seq_len=1024, d_model=64, num_layers=4, window=128, steps=500,
             batch_size=8, multiples=(1, 2, 4), eval_tokens=65536, sparse_steps=125,
             scored=64, cuts=(128, 256, 512))
QUICK = Sizes(smoke=True, seq_len=64, d_model=32, num_layers=3, window=16, steps=2,
              batch_size=4, multiples=(1,), eval_tokens=256, sparse_steps=1, scored=16,
              cuts=(32,), patterns=("alternating", "dsa"))  # 1x only: 2x / YaRN as row 3's


def config_for(sizes: Sizes, pattern: str, seed: int, workdir: str):
  """The run of `pattern` (`text.py:<pattern>`; alternating and dsa: `text.py:dsa`'s chain,
  the sparse stage starting from `<workdir>/alternating_s<seed>`) at the row's size."""
  chain = pattern in ("alternating", "dsa")
  variant = "dsa" if chain else pattern
  config = text.get_config(f"{variant},smoke" if sizes.smoke else variant)
  config.seed = seed
  config.task.seq_len = sizes.seq_len
  config.model.kinds.local.window = sizes.window
  if sizes.smoke:
    config.num_steps = sizes.steps
    base.at_end_only(config)
  else:
    config.model.update(d_model=sizes.d_model, num_layers=sizes.num_layers, num_heads=4,
                        mlp_dim=2 * sizes.d_model)
    config.update(num_steps=sizes.steps, batch_size=sizes.batch_size, eval_every=sizes.steps,
                  progress=False)
  if chain:  # its own steps and checkpoints
    config.model.kinds.dsa.options.top_k = sizes.seq_len // 8
    dsa.chain_stage(config, pattern == "dsa", os.path.join(workdir, f"alternating_s{seed}"),
                    sizes.steps, sizes.sparse_steps)
    config.eval_every = config.num_steps
    if sizes.smoke:
      config.log_every = config.num_steps
  return config


@nnx.jit
def token_losses(model, batch):
  """`[B, T]` cross-entropy (nats) of every next-byte prediction."""
  logits, _ = model(batch["tokens"], segment_ids=batch["segment_ids"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])


def context_lengths(segment_ids: np.ndarray) -> np.ndarray:
  """`[B, T]` tokens of its own document each position sees (itself included) in its row."""
  b, t = segment_ids.shape
  index = np.broadcast_to(np.arange(t), (b, t))
  starts = np.concatenate([np.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  return index - first + 1


def held_out_rows(task: tasks.Text, length: int, rows: int) -> list[dict[str, np.ndarray]]:
  """`rows` held-out batches of one row of `length` bytes (the trainer's evaluation stream)."""
  return [task.batch(i, 1, salt=1, seq_len=length) for i in range(rows)]


def loss_by_position(model, batches: list[dict[str, np.ndarray]]) -> list[dict]:
  """Held-out loss over `batches` (rows of one length), per doubling context bucket and
  (bucket [0, length]) overall."""
  length = batches[0]["tokens"].shape[1]
  top = int(math.log2(length)) - 1  # the last bucket [length/2, length] holds context = length
  sums = np.zeros(top + 1)
  counts = np.zeros_like(sums)
  for batch in batches:
    losses = np.asarray(jax.device_get(token_losses(model, trainer.to_device(batch))))
    bucket = np.minimum(np.log2(context_lengths(batch["segment_ids"])).astype(int), top)
    mask = batch["loss_mask"] > 0
    np.add.at(sums, bucket[mask], losses[mask])
    np.add.at(counts, bucket[mask], 1)
  out = [dict(bucket_lo=2 ** k, bucket_hi=2 ** (k + 1), tokens=int(c), loss=float(s / c))
         for k, (s, c) in enumerate(zip(sums, counts)) if c]
  return out + [dict(bucket_lo=0, bucket_hi=length, tokens=int(counts.sum()),
                     loss=float(sums.sum() / counts.sum()))]


def context_ablation(model, batches: list[dict[str, np.ndarray]], cuts: Sequence[int],
                     scored: int) -> list[dict]:
  """Held-out loss (nats per byte) of each row's last `scored` bytes given only the row's last
  c bytes, for c in `cuts` and the whole row (c = T).

  `batches`: rows of one length T, one row each (`[1, T]` fields, as `held_out_rows`); only
  the rows that lie inside one file (one segment, every scored target in it) count, so a cut
  removes context the scored bytes had. The rows are the same for every c: the differences
  are paired. Returns `[{context: c, tokens, loss}]`, the whole row last. Raises ValueError
  if `scored` exceeds a cut or no row lies inside one file.
  """
  length = batches[0]["tokens"].shape[1]
  if not 0 < scored <= min(cuts, default=length) or max(cuts, default=0) >= length:
    raise ValueError(f"context_ablation: need 0 < scored={scored} <= every cut and cuts "
                     f"{tuple(cuts)} < the row length {length}.")
  inside = [b for b in batches if (b["segment_ids"] == b["segment_ids"][0, 0]).all()
            and b["loss_mask"][0, -scored:].all()]
  if not inside:
    raise ValueError(f"context_ablation: none of the {len(batches)} rows of {length} bytes "
                     f"lies inside one file.")
  out = []
  for c in (*cuts, length):
    total = 0.0
    for batch in inside:
      cut = trainer.to_device({k: v[:, -c:] for k, v in batch.items()})
      total += float(np.sum(np.asarray(jax.device_get(token_losses(model, cut)))[:, -scored:]))
    out.append(dict(context=c, tokens=len(inside) * scored, loss=total / (len(inside) * scored)))
  return out


def model_records(ctx: base.Context, sizes: Sizes, pattern: str, seed: int) -> list[dict]:
  """Trains (resuming) one model and measures it, cached per (length, RoPE) in its workdir.

  Records (`ROW.columns`): per (length, RoPE), one per context bucket and one for the whole
  length (`bucket_lo` 0), with `context_cut` 0; at 1x with the trained RoPE also the context
  ablation's, one per context c given (`context_cut` = c; `bucket_lo`/`bucket_hi`: the
  contexts its scored bytes had, [c - scored + 1, c + 1)). Every record of a (length, RoPE)
  carries its attention FLOPs against all-global and the indexer recall (NaN: no DSA layer).
  """
  config = config_for(sizes, pattern, seed, ctx.workdir)
  run_dir = base.train_run(config, ctx.path(f"{pattern}_s{seed}"))
  all_global = config_for(sizes, "global", seed, ctx.workdir)
  records = []
  for multiple in sizes.multiples:
    length = multiple * sizes.seq_len
    cost = dsa.attention_flops(config, length) / dsa.attention_flops(all_global, length)
    for rope in ("none", "yarn") if multiple > 1 else ("none",):
      factor = float(multiple) if rope == "yarn" else 1.0
      ablate = multiple == 1

      def compute(rope=rope, factor=factor, length=length, ablate=ablate):
        config, model, _ = runs.load_run(run_dir, rope, factor)
        task = tasks.make_task(config.task, seed=config.seed)
        batches = held_out_rows(task, length, max(1, sizes.eval_tokens // length))
        recall = [r["recall"] for r in scores.batch_recall(model, batches)] or [math.nan]
        return dict(buckets=loss_by_position(model, batches), recall=recall,
                    ablation=context_ablation(model, batches, sizes.cuts, sizes.scored)
                    if ablate else [])

      cut = f"_cut{'-'.join(map(str, sizes.cuts))}x{sizes.scored}" if ablate else ""
      tag = f"row5d_{rope}{factor:g}_{length}_{sizes.eval_tokens}{cut}.json"
      measured = base.cached(os.path.join(run_dir, tag), compute)
      head = dict(pattern=pattern, seed=seed, rope=rope, factor=factor, length=length,
                  multiple=multiple)
      tail = dict(attn_flops_vs_global=cost, recall_first_dsa_layer=measured["recall"][0],
                  recall_last_dsa_layer=measured["recall"][-1])
      for r in measured["buckets"]:
        records.append(dict(head, context_cut=0, **r, bits_per_byte=r["loss"] / math.log(2),
                            **tail))
      for r in measured["ablation"]:
        c = r["context"]
        records.append(dict(head, context_cut=c, bucket_lo=c - sizes.scored + 1,
                            bucket_hi=c + 1, tokens=r["tokens"], loss=r["loss"],
                            bits_per_byte=r["loss"] / math.log(2), **tail))
  return records


def whole_rows(records: list[dict]) -> list[dict]:
  """The records measured on whole rows (not the context ablation's)."""
  return [r for r in records if r["context_cut"] == 0]


def totals(records: list[dict]) -> list[dict]:
  """Each (model, seed, length, RoPE)'s record over the whole length (bucket [0, length])."""
  return [r for r in whole_rows(records) if r["bucket_lo"] == 0]


def ablation_table(records: list[dict], sizes: Sizes) -> str:
  """Bits per byte of each 1x row's last `scored` bytes by the context they were given, and
  what cutting it to the smallest cut costs (per seed, then mean (min-max) over seeds)."""
  contexts = [*sizes.cuts, sizes.seq_len]
  header = (["pattern"] + [f"context cut to {c}" if c < sizes.seq_len else
                           f"whole row ({c})" for c in contexts]
            + [f"cost of the cut to {contexts[0]}"])
  rows = []
  for pattern in sizes.patterns:
    by_seed = {}
    for r in records:
      if r["pattern"] == pattern and r["context_cut"]:
        by_seed.setdefault(r["seed"], {})[r["context_cut"]] = r["bits_per_byte"]
    costs = [v[contexts[0]] - v[contexts[-1]] for v in by_seed.values()]
    rows.append([pattern] + [base.cell([v[c] for v in by_seed.values()], "{:.3f}")
                             for c in contexts] + [base.cell(costs, "{:+.3f}")])
  return base.markdown_table(header, rows)


def bpb_table(records: list[dict], sizes: Sizes) -> str:
  """Bits per byte per (pattern, RoPE) and length: mean (min-max) over seeds."""
  header = ["pattern", "RoPE past L"] + [f"{m}x ({m * sizes.seq_len})" for m in sizes.multiples]
  rows, whole = [], totals(records)
  for pattern in sizes.patterns:
    for rope in ("none", "yarn"):
      cells = []
      for multiple in sizes.multiples:
        r_rope = rope if multiple > 1 else "none"
        values = [r["bits_per_byte"] for r in whole if r["pattern"] == pattern
                  and r["rope"] == r_rope and r["multiple"] == multiple]
        cells.append(base.cell(values, "{:.3f}"))
      rows.append([pattern, rope if rope == "yarn" else "none"] + cells)
  return base.markdown_table(header, rows)


def cost_table(records: list[dict], sizes: Sizes) -> str:
  """Per pattern: attention FLOPs per token against all-global and (DSA layers) indexer
  recall, at each length (recall: mean (min-max) over seeds, the trained RoPE)."""
  header = (["pattern"] + [f"attention FLOPs vs global, {m}x" for m in sizes.multiples]
            + [f"indexer recall first / last DSA layer, {m}x" for m in sizes.multiples])
  rows, whole = [], totals(records)
  for pattern in sizes.patterns:
    mine = {m: [r for r in whole if r["pattern"] == pattern and r["multiple"] == m
                and r["rope"] == "none"] for m in sizes.multiples}
    recalls = ["-" if math.isnan(mine[m][0]["recall_first_dsa_layer"]) else
               " / ".join(base.cell([r[k] for r in mine[m]], "{:.2f}")
                          for k in ("recall_first_dsa_layer", "recall_last_dsa_layer"))
               for m in sizes.multiples]
    rows.append([pattern] + [f"{mine[m][0]['attn_flops_vs_global']:.2f}"
                             for m in sizes.multiples] + recalls)
  return base.markdown_table(header, rows)


def plot(records: list[dict], sizes: Sizes, path: str) -> None:
  """Loss against context (log x), one panel per pattern, a line per (length, RoPE)."""
  fig, axes = plots.figure(1, len(sizes.patterns), figsize=(4.2 * len(sizes.patterns), 3.6),
                           sharey=True, squeeze=False)
  for ax, pattern in zip(axes[0], sizes.patterns):
    for multiple in sizes.multiples:
      for rope in ("none", "yarn") if multiple > 1 else ("none",):
        mine = [r for r in whole_rows(records) if r["pattern"] == pattern
                and r["multiple"] == multiple and r["rope"] == rope and r["bucket_lo"] > 0]
        los = sorted({r["bucket_lo"] for r in mine})
        means = [np.mean([r["loss"] for r in mine if r["bucket_lo"] == lo]) for lo in los]
        ax.plot([lo * 1.5 for lo in los], means, marker="o", markersize=3,
                linestyle="--" if rope == "yarn" else "-",
                label=f"{multiple}x ({multiple * sizes.seq_len})" + (" YaRN" if rope == "yarn"
                                                                      else ""))
    ax.axvline(sizes.seq_len, color="gray", linestyle=":")
    if pattern != "global":
      ax.axvline(sizes.window, color="red", linestyle=":", alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_title(f"{pattern} (L = {sizes.seq_len}, window {sizes.window})", fontsize=9)
    ax.set_xlabel("context of the token (bytes of its file seen)")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("held-out loss (nats / byte), mean over seeds")
  axes[0][-1].legend(fontsize=7)
  plots.save(fig, path)


def run(ctx: base.Context) -> base.Result:
  sizes = QUICK if ctx.quick else FULL
  seeds = ctx.run_seeds
  records = [r for seed in seeds for pattern in sizes.patterns
             for r in model_records(ctx, sizes, pattern, seed)]
  note = (f"Held-out bits per byte ({sizes.eval_tokens} bytes per cell and seed; every 10th "
          f"stdlib file held out), trained at L = {sizes.seq_len} for {sizes.steps} steps of "
          f"{sizes.batch_size} rows (dsa: top_k = {sizes.seq_len // 8} = L/8, sparse for the "
          f"last {sizes.sparse_steps}); mean (min-max) over seeds {', '.join(map(str, seeds))}. "
          f"YaRN: s = length / L. Context ablation: bits per byte of the last {sizes.scored} "
          f"bytes of each 1x row inside one file, given the row's last c bytes only.")
  tables = "\n\n".join(t(records, sizes) for t in (bpb_table, ablation_table, cost_table))
  return base.Result(records, f"{note}\n\n{tables}",
                     lambda path: plot(records, sizes, path))


# `context_cut`: 0 for the whole-row records (by-position buckets), c for the ablation's.
ROW = base.Row(number=5, name="text",
               title="Real text: loss by position and by context given, 1x-4x, with and "
               "without YaRN, four layer patterns",
               columns=("pattern", "seed", "rope", "factor", "length", "multiple", "context_cut",
                        "bucket_lo", "bucket_hi", "tokens", "loss", "bits_per_byte",
                        "attn_flops_vs_global", "recall_first_dsa_layer", "recall_last_dsa_layer"),
               run=run, unmeasured=("recall_first_dsa_layer", "recall_last_dsa_layer"))
