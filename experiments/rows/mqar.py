"""Row 2: multi-query associative recall (Zoology) by layer pattern, at the same budget.

experiments/configs/mqar.py's three patterns (`:global`, `:local`, `:alternating`; identical
parameters, steps, data and seeds), each trained per seed, then scored on `BATCHES` held-out
batches of the task (the trainer's evaluation stream): per-query accuracy (Zoology's metric:
the share of queried values predicted exactly) and exact match (every query of a sequence
right). The target (issue 17): all-global >= 0.9 per-query accuracy.
"""

from __future__ import annotations

from experiments import plots, trainer
from experiments.configs import mqar
from experiments.rows import base, grids
from models import flops

SETTINGS = ("global", "local", "alternating")
BATCHES = 8  # x batch_size held-out sequences per run
COLUMNS = ("setting", "layers", "seed", "seq_len", "num_kv_pairs", "vocab_size", "steps",
           "sequences", "per_query_accuracy", "exact_match", "attn_flops_vs_global")


def make_config(setting: str, seed: int, quick: bool):
  return grids.variant_config(mqar.get_config, setting, seed, quick)


def measure(ctx: base.Context, workdir: str, setting: str, seed: int) -> list[dict]:
  config = make_config(setting, seed, ctx.quick)
  batches = 1 if ctx.quick else BATCHES
  scores = grids.held_out_scores(workdir, batches, config.batch_size)
  model_config = trainer.model_config(config)
  dense = trainer.model_config(make_config("global", seed, ctx.quick))
  seq_len = config.task.seq_len
  return [dict(setting=setting, layers="".join(k[0].upper() for k in model_config.layer_kinds),
               seed=seed, seq_len=seq_len, num_kv_pairs=config.task.num_kv_pairs,
               vocab_size=config.task.vocab_size, steps=config.num_steps,
               sequences=batches * config.batch_size,
               per_query_accuracy=scores["token_accuracy"], exact_match=scores["accuracy"],
               attn_flops_vs_global=flops.attention_flops_per_token(model_config, seq_len)
               / flops.attention_flops_per_token(dense, seq_len))]


def run(ctx: base.Context) -> base.Result:
  records = grids.run_settings(ctx, SETTINGS, lambda s, d: make_config(s, d, ctx.quick),
                               lambda w, s, d: measure(ctx, w, s, d))
  by = {s: [r for r in records if r["setting"] == s] for s in SETTINGS}
  first = records[0]
  table = base.markdown_table(
      ["pattern", "layers", "per-query accuracy", "exact match (all queries)",
       "attention FLOPs vs all-global"],
      [[s, by[s][0]["layers"], base.cell([r["per_query_accuracy"] for r in by[s]]),
        base.cell([r["exact_match"] for r in by[s]]), f"{by[s][0]['attn_flops_vs_global']:.2f}"]
       for s in SETTINGS])
  note = (f"MQAR: {first['num_kv_pairs']} key-value pairs, sequence length {first['seq_len']}, "
          f"vocabulary {first['vocab_size']}; {first['steps']} steps; {first['sequences']} "
          f"held-out sequences per run; mean (min-max) over "
          f"{grids.seeds_note(records)}.")
  plot = lambda path: plot_bars(records, path)
  return base.Result(records, f"{table}\n\n{note}", plot)


def plot_bars(records: list[dict], path: str) -> None:
  """Per-query accuracy by pattern: mean over seeds, with min-max error bars."""
  stats = [base.spread([r["per_query_accuracy"] for r in records if r["setting"] == s])
           for s in SETTINGS]
  means = [s["mean"] for s in stats]
  errors = [[m - s["lo"] for m, s in zip(means, stats)],
            [s["hi"] - m for m, s in zip(means, stats)]]
  fig, ax = plots.figure(figsize=(5, 3.5))
  ax.bar(SETTINGS, means, yerr=errors, capsize=6, color=["C0", "C1", "C2"])
  ax.axhline(0.9, color="gray", linestyle=":", label="target 0.9")
  plots.label(ax, ylabel="MQAR per-query accuracy", ylim=(0, 1.02),
              title=f"MQAR ({records[0]['num_kv_pairs']} pairs, length {records[0]['seq_len']})")
  plots.save(fig, path)


ROW = base.Row(number=2, name="mqar", title="MQAR (Zoology) by layer pattern",
               columns=COLUMNS, run=run)
