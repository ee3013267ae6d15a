"""Row 2: multi-query associative recall (Zoology) by layer pattern, at the same budget.

experiments/configs/mqar.py's three patterns (`:global`, `:local`, `:alternating`; identical
parameters, steps, data and seeds), each trained per seed, then scored on `BATCHES` held-out
batches of the task (the trainer's evaluation stream): per-query accuracy (Zoology's metric:
the share of queried values predicted exactly) and exact match (every query of a sequence
right). The target: all-global >= 0.9 per-query accuracy.

DSA (row 4's comparison on MQAR; row 4's chain, `dsa.chain_stage`): `mqar.py:dsa` is the
alternating model with its global layer as a DSA layer (L D, top_k = L / 8 = 4 keys). Per seed:
`dsa_dense`, the dense stage for `STEPS` steps with the indexer's KL (the dense model, and at
step `STEPS - SPARSE_STEPS` DeepSeek's dense warm-up); `dsa`, DeepSeek's sparse stage for
`SPARSE_STEPS` steps from there: `STEPS` in all. Their records add the indexer recall of the
DSA layer on the same held-out batches (NaN for the patterns without one).
"""

from __future__ import annotations

from experiments.data import tasks
from experiments.evaluation import runs, scores
from experiments.training import plots, trainer
from experiments.configs import mqar
from experiments.rows import base, dsa, grids
from models import flops

SETTINGS = ("global", "local", "alternating", "dsa_dense", "dsa")
QUICK_SETTINGS = ("alternating", "dsa_dense", "dsa")  # global/local: alternating's code path
STEPS, SPARSE_STEPS = 10000, 2500  # the patterns' steps; sparse: the last quarter, as row 4
BATCHES = 8  # x batch_size held-out sequences per run
COLUMNS = ("setting", "layers", "seed", "seq_len", "num_kv_pairs", "vocab_size", "steps",
           "sequences", "per_query_accuracy", "exact_match", "attn_flops_vs_global", "top_k",
           "indexer_recall")


def chain_steps(ctx: base.Context) -> tuple[int, int]:
  """(total steps, sparse steps) of the DSA chain; `--quick`: 2 and 1."""
  return (2, 1) if ctx.quick else (STEPS, SPARSE_STEPS)


def make_config(ctx: base.Context, setting: str, seed: int):
  """`mqar.py:<setting>`; the DSA settings are `mqar.py:dsa` in row 4's two-stage chain."""
  if not setting.startswith("dsa"):
    return grids.variant_config(mqar.get_config, setting, seed, ctx.quick)
  config = grids.variant_config(mqar.get_config, "dsa", seed, ctx.quick)
  dsa.chain_stage(config, setting == "dsa", ctx.path(f"dsa_dense_s{seed}"), *chain_steps(ctx))
  if ctx.quick:
    config.log_every = config.eval_every = config.num_steps
  return config


def measure(ctx: base.Context, workdir: str, setting: str, seed: int) -> list[dict]:
  config = make_config(ctx, setting, seed)
  batches = 1 if ctx.quick else BATCHES
  _, model, step = runs.load_run(workdir)
  task = tasks.make_task(config.task, seed=config.seed)  # the trainer's evaluation stream
  held_out = [task.batch(i, config.batch_size, salt=1) for i in range(batches)]
  held_out_scores = trainer.evaluate_batches(model, held_out)
  model_config = trainer.model_config(config)
  dense = trainer.model_config(make_config(ctx, "global", seed))
  seq_len = config.task.seq_len
  # No DSA layer: top_k 0, recall NaN ("not measured"); L D has one (its first is its last).
  chain = dict(top_k=0, steps=config.num_steps, recall_first_dsa_layer=float("nan"))
  if setting.startswith("dsa"):
    chain = dsa.dsa_columns(config, step, scores.batch_recall(model, held_out))
  return [dict(setting=setting, layers="".join(k[0].upper() for k in model_config.layer_kinds),
               seed=seed, seq_len=seq_len, num_kv_pairs=config.task.num_kv_pairs,
               vocab_size=config.task.vocab_size, steps=chain["steps"],
               sequences=batches * config.batch_size,
               per_query_accuracy=held_out_scores["token_accuracy"],
               exact_match=held_out_scores["accuracy"],
               attn_flops_vs_global=flops.attention_flops_per_token(model_config, seq_len)
               / flops.attention_flops_per_token(dense, seq_len),
               top_k=chain["top_k"], indexer_recall=chain["recall_first_dsa_layer"])]


def run(ctx: base.Context) -> base.Result:
  settings = QUICK_SETTINGS if ctx.quick else SETTINGS
  records = grids.run_settings(ctx, settings, lambda s, d: make_config(ctx, s, d),
                               lambda w, s, d: measure(ctx, w, s, d))
  by = {s: [r for r in records if r["setting"] == s] for s in settings}
  first = records[0]
  table = base.markdown_table(
      ["setting", "layers", "total steps", "per-query accuracy", "exact match (all queries)",
       "indexer recall", "attention FLOPs vs all-global"],
      [[s, by[s][0]["layers"], by[s][0]["steps"],
        base.cell([r["per_query_accuracy"] for r in by[s]]),
        base.cell([r["exact_match"] for r in by[s]]),
        base.cell([r["indexer_recall"] for r in by[s]], "{:.3f}") if by[s][0]["top_k"] else "-",
        f"{by[s][0]['attn_flops_vs_global']:.2f}"] for s in settings])
  note = (f"MQAR: {first['num_kv_pairs']} key-value pairs, sequence length {first['seq_len']}, "
          f"vocabulary {first['vocab_size']}; {first['sequences']} held-out sequences per run; "
          f"DSA (L D): top_k = {by['dsa'][0]['top_k']} = L/8, dsa_dense is the dense stage "
          f"with the indexer's KL, dsa its last {chain_steps(ctx)[1]} steps "
          f"sparse; mean (min-max) over {grids.seeds_note(records)}.")
  plot = lambda path: plot_bars(records, path)
  return base.Result(records, f"{table}\n\n{note}", plot)


def plot_bars(records: list[dict], path: str) -> None:
  """Per-query accuracy by setting: mean over seeds, with min-max error bars."""
  settings = list(dict.fromkeys(r["setting"] for r in records))
  stats = [base.spread([r["per_query_accuracy"] for r in records if r["setting"] == s])
           for s in settings]
  means = [s["mean"] for s in stats]
  errors = [[m - s["lo"] for m, s in zip(means, stats)],
            [s["hi"] - m for m, s in zip(means, stats)]]
  fig, ax = plots.figure(figsize=(5, 3.5))
  ax.bar(settings, means, yerr=errors, capsize=6, color=[f"C{i}" for i in range(len(settings))])
  ax.axhline(0.9, color="gray", linestyle=":", label="target 0.9")
  plots.label(ax, ylabel="MQAR per-query accuracy", ylim=(0, 1.02),
              title=f"MQAR ({records[0]['num_kv_pairs']} pairs, length {records[0]['seq_len']})")
  plots.save(fig, path)


ROW = base.Row(number=2, name="mqar", title="MQAR (Zoology) by layer pattern and DSA",
               columns=COLUMNS, run=run, unmeasured=("indexer_recall",))
