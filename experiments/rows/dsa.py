"""Row 4: DeepSeek Sparse Attention vs the dense model at the same total steps (passkey).

The row-1 passkey recipe (experiments/configs/patterns.py: rows of 128 tokens, 4 layers, local
window 8) with ModernBERT's global layers replaced by DSA layers (experiments/configs/dsa.py:
pattern dsa, local, local, dsa; indexer 4 heads x 32 dims) and top_k = L / 8 = 16 keys. Per seed:

* `dense`: `dsa.py` stage "dense" (flash attention over every key) for `STEPS` steps; the
  indexer learns its KL to the dense attention alongside (detached input: it cannot change the
  model). This is the dense model, and its step `STEPS - SPARSE_STEPS` is DeepSeek's stage 1
  (dense warm-up with the KL loss) of the sparse chain.
* `dsa`: `dsa.py:sparse` (DeepSeek stage 2: each query attends to its indexer's top-k keys,
  everything trains) for `SPARSE_STEPS` steps from the dense run's step `STEPS - SPARSE_STEPS`
  (`init_step`): `STEPS` steps in all, the same as the dense model.

The chain (`chain_stage`, `dsa_columns`) is shared with row 2's DSA settings on MQAR
(experiments/rows/mqar.py).

Measured: passkey exact match per depth at L (`scores.grid`), indexer recall per DSA layer
(`scores.indexer_recall`: the dense attention mass on the top-k keys), and attention FLOPs
per token (`models.flops`; sparse: top_k keys per DSA layer plus the indexer's scores).
"""

from __future__ import annotations

import math

from experiments.evaluation import runs, scores
from experiments.training import trainer
from experiments.configs import dsa as dsa_config
from experiments.configs import patterns
from experiments.rows import base, grids
from models import flops

SETTINGS = ("dense", "dsa")
STEPS, SPARSE_STEPS = 800, 200
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
EXAMPLES = 32
COLUMNS = ("setting", "seed", "length", "top_k", "steps", "depth", "examples", "accuracy",
           "recall_first_dsa_layer", "recall_last_dsa_layer", "attn_flops_per_token",
           "attn_flops_vs_dense")


def make_config(ctx: base.Context, setting: str, seed: int):
  """`dsa.py` (stage of `setting`) at row 1's passkey sizes, top_k = L / 8."""
  smoke = ",smoke" if ctx.quick else ""
  config = dsa_config.get_config("dense" + smoke)
  sizes = patterns.get_config("alternating" + smoke)
  config.task = sizes.task
  config.model.kinds.local.window = sizes.model.kinds.local.window
  config.model.kinds.dsa.options.top_k = config.task.seq_len // 8
  config.batch_size, config.seed = sizes.batch_size, seed
  steps, sparse_steps = (2, 1) if ctx.quick else (STEPS, SPARSE_STEPS)
  chain_stage(config, setting == "dsa", ctx.path(f"dense_s{seed}"), steps, sparse_steps)
  config.eval_every = config.num_steps if ctx.quick else sizes.eval_every
  config.log_every = min(config.log_every, config.eval_every)
  return config


def chain_stage(config, sparse: bool, dense_workdir: str, steps: int, sparse_steps: int):
  """DeepSeek's two stages at the same total steps, in place on a dense-stage DSA `config`
  (its "dsa" kind in stage "dense", the indexer's KL in `aux_losses`; rows 2 and 4).

  Not `sparse`: the dense model, `steps` steps, with a checkpoint kept at step
  `steps - sparse_steps` (the end of stage 1, the dense warm-up with the KL loss).
  `sparse`: stage 2 (`dsa.sparse_stage`) for `sparse_steps` steps from that checkpoint of
  the dense run in `dense_workdir`: `steps` steps in all, as the dense model.
  """
  warmup = steps - sparse_steps
  if not 0 < sparse_steps < steps:
    raise ValueError(f"sparse_steps={sparse_steps} must be in (0, steps={steps}).")
  if sparse:
    dsa_config.sparse_stage(config)
    config.update(num_steps=sparse_steps, init_from=dense_workdir, init_step=warmup,
                  checkpoint_every=sparse_steps)
  else:  # checkpoints every gcd steps, the last two kept: `warmup` and `steps`
    config.update(num_steps=steps, checkpoint_every=math.gcd(warmup, sparse_steps),
                  max_to_keep=2)
  config.eval_after_train = False


def dsa_columns(config, step: int, recall: list[dict]) -> dict:
  """The DSA columns of a chain run's record: top_k, total steps (a sparse run's own plus
  its dense warm-up's), indexer recall of the first and last DSA layer (`batch_recall`)."""
  return dict(top_k=config.model.kinds.dsa.options.top_k,
              steps=step + (config.init_step if config.init_from else 0),
              recall_first_dsa_layer=recall[0]["recall"],
              recall_last_dsa_layer=recall[-1]["recall"])


def attention_flops(config, context: int) -> int:
  """Attention FLOPs per token at `context` (`models.flops`: a sparse DSA layer attends to
  `top_k` keys and its indexer scores every visible key)."""
  return flops.attention_flops_per_token(trainer.model_config(config), context)


def measure(ctx: base.Context, workdir: str, setting: str, seed: int) -> list[dict]:
  config, model, step = runs.load_run(workdir)
  length = config.task.seq_len
  examples = 4 if ctx.quick else EXAMPLES
  cells = scores.grid(model, config, "passkey", [length], DEPTHS, examples, examples)
  recall = scores.indexer_recall(model, config, "passkey", length, DEPTHS, examples, examples)
  cost = attention_flops(config, length)
  dense = attention_flops(make_config(ctx, "dense", seed), length)
  chain = dsa_columns(config, step, recall)
  return [dict(setting=setting, seed=seed, length=length, top_k=chain["top_k"],
               steps=chain["steps"], depth=c["depth"], examples=examples,
               accuracy=c["accuracy"], recall_first_dsa_layer=chain["recall_first_dsa_layer"],
               recall_last_dsa_layer=chain["recall_last_dsa_layer"],
               attn_flops_per_token=cost, attn_flops_vs_dense=cost / dense) for c in cells]


def run(ctx: base.Context) -> base.Result:
  records = grids.run_settings(ctx, SETTINGS, lambda s, d: make_config(ctx, s, d),
                               lambda w, s, d: measure(ctx, w, s, d))
  first = records[0]
  table = grids.seed_table(records, "depth", "setting", "accuracy",
                           f"passkey depth \\ model (exact match at {first['length']} tokens)")
  summary = []
  for setting in SETTINGS:
    mine = [r for r in records if r["setting"] == setting]
    per_seed = {r["seed"]: r for r in mine}.values()
    summary.append([setting, mine[0]["steps"],
                    base.cell([r["recall_first_dsa_layer"] for r in per_seed]),
                    base.cell([r["recall_last_dsa_layer"] for r in per_seed]),
                    f"{mine[0]['attn_flops_per_token']:,}",
                    f"{mine[0]['attn_flops_vs_dense']:.2f}"])
  costs = base.markdown_table(
      ["model", "total steps", "indexer recall, first DSA layer", "last DSA layer",
       f"attention FLOPs / token at {first['length']}", "vs dense"], summary)
  note = (f"top_k = {first['top_k']} = L/8; {first['examples']} prompts per cell and seed; "
          f"mean (min-max) over {grids.seeds_note(records)}.")
  plot = grids.depth_plot(records, f"DSA (top-{first['top_k']}) vs dense at {first['length']} "
                                    "tokens")
  return base.Result(records, f"{table}\n\n{costs}\n\n{note}", plot)


ROW = base.Row(number=4, name="dsa", title="DSA vs dense at the same total steps (passkey)",
               columns=COLUMNS, run=run)
