"""Row 1: local vs alternating vs global layers at the same budget (passkey at 1x).

Three decoders that differ only in `layer_pattern` (experiments/configs/patterns.py: all global,
all local with a window far below the needle distance, ModernBERT's global-every-3rd-layer),
trained with the same parameters, steps, data and seeds. Measured: passkey exact match per
needle depth at the training length (`scores.grid`, `EXAMPLES` prompts per cell) and each
model's attention FLOPs per token (`models.flops`) at the training length and at 8K tokens.
Claims tested (ModernBERT): local-only near 0; alternating within 5 points of all-global at a
fraction of its attention FLOPs.
"""

from __future__ import annotations

from experiments.evaluation import runs, scores
from experiments.training import trainer
from experiments.configs import patterns
from experiments.rows import base, grids
from models import flops

SETTINGS = ("global", "local", "alternating")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
EXAMPLES = 32
LONG_CONTEXT = 8192  # where the FLOPs fraction approaches its asymptote
COLUMNS = ("setting", "layers", "seed", "length", "depth", "examples", "accuracy",
           "attn_flops_per_token", "attn_flops_vs_global", "attn_flops_vs_global_8k")


def make_config(setting: str, seed: int, quick: bool):
  return grids.variant_config(patterns.get_config, setting, seed, quick)


def attention_flops(setting: str, quick: bool, context: int) -> int:
  return flops.attention_flops_per_token(
      trainer.model_config(make_config(setting, 0, quick)), context)


def measure(ctx: base.Context, workdir: str, setting: str, seed: int) -> list[dict]:
  config, model, _ = runs.load_run(workdir)
  length = config.task.seq_len
  examples = 4 if ctx.quick else EXAMPLES  # quick: the smoke eval batch [4, T]
  cells = scores.grid(model, config, "passkey", [length], DEPTHS, examples, examples)
  own = {c: attention_flops(setting, ctx.quick, c) for c in (length, LONG_CONTEXT)}
  dense = {c: attention_flops("global", ctx.quick, c) for c in (length, LONG_CONTEXT)}
  return [dict(setting=setting, layers="".join(k[0].upper() for k in model.config.layer_kinds),
               seed=seed, length=length, depth=c["depth"], examples=examples,
               accuracy=c["accuracy"], attn_flops_per_token=own[length],
               attn_flops_vs_global=own[length] / dense[length],
               attn_flops_vs_global_8k=own[LONG_CONTEXT] / dense[LONG_CONTEXT])
          for c in cells]


def run(ctx: base.Context) -> base.Result:
  records = grids.run_settings(ctx, SETTINGS, lambda s, d: make_config(s, d, ctx.quick),
                               lambda w, s, d: measure(ctx, w, s, d))
  length = records[0]["length"]
  table = grids.seed_table(records, "depth", "setting", "accuracy",
                           f"passkey depth \\ pattern (exact match at {length} tokens)")
  first = {r["setting"]: r for r in records}
  cost = base.markdown_table(
      ["pattern", "layers", f"attention FLOPs / token at {length}", "vs all-global",
       f"vs all-global at {LONG_CONTEXT}"],
      [[s, first[s]["layers"], f"{first[s]['attn_flops_per_token']:,}",
        f"{first[s]['attn_flops_vs_global']:.2f}", f"{first[s]['attn_flops_vs_global_8k']:.2f}"]
       for s in SETTINGS])
  note = (f"{records[0]['examples']} prompts per cell and seed; cells: mean (min-max) over "
          f"{grids.seeds_note(records)}; the mean row averages each seed's depths.")
  plot = grids.depth_plot(records, f"Passkey at {length} tokens (mean, min-max over seeds)")
  return base.Result(records, f"{table}\n\n{cost}\n\n{note}", plot)


ROW = base.Row(number=1, name="patterns", title="Local vs alternating vs global layers, same "
               "budget (passkey)", columns=COLUMNS, run=run)
