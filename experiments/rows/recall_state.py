"""Row 7: recall against state size. MQAR at 8-64 key-value pairs for attention, gdn, hybrid.

experiments/configs/mqar_state.py's four patterns (`:global`, `:gdn`, `:hybrid` = gdn:global
3:1, `:local`; identical parameters, steps, data and seeds), each trained once per seed at 16
pairs / 64 tokens, then scored on `BATCHES` held-out batches of MQAR at each of `PAIRS` pairs
(row 2's density: `seq_len = 4 x pairs`; same vocabulary, the trainer's evaluation stream's
salt): per-query accuracy (Zoology's metric) and exact match. Each record also carries the
layers' decode memory at that length (`models.flops.cache_bytes`): growing with the context for
attention, fixed for gdn. Expected (Zoology; Qwen3-Next's reason for its global layers): the
attention models recall at every size, gdn-only falls once the pairs outgrow its state, the
hybrid tracks global.
"""

from __future__ import annotations

from experiments.configs import mqar_state
from experiments.data import tasks
from experiments.evaluation import runs
from experiments.rows import base, grids
from experiments.training import trainer
from models import flops

SETTINGS = ("gdn", "hybrid", "global", "local")
QUICK_SETTINGS = ("global",)  # the others run the same code with another pattern (the gdn
# layer itself is tested in tests/models/test_gdn.py; its compile would double this row's quick cost)
PAIRS = (8, 16, 32, 64)
QUICK_PAIRS = (4, 8)
BATCHES = 4  # x EVAL_BATCH held-out sequences per (run, pairs)
EVAL_BATCH = 32
COLUMNS = ("setting", "layers", "seed", "train_pairs", "num_kv_pairs", "seq_len", "vocab_size",
           "steps", "sequences", "per_query_accuracy", "exact_match", "cache_bytes")


def make_config(ctx: base.Context, setting: str, seed: int):
  return grids.variant_config(mqar_state.get_config, setting, seed, ctx.quick)


def measure(ctx: base.Context, workdir: str, setting: str, seed: int) -> list[dict]:
  """One record per pair count: the run's model on held-out MQAR at that size."""
  config = make_config(ctx, setting, seed)
  _, model, _ = runs.load_run(workdir)
  model_config = trainer.model_config(config)
  batches, batch = (1, 4) if ctx.quick else (BATCHES, EVAL_BATCH)
  records = []
  for pairs in (QUICK_PAIRS if ctx.quick else PAIRS):
    task = tasks.make_task(dict(config.task.to_dict(), seq_len=4 * pairs, num_kv_pairs=pairs),
                           seed=config.seed)
    held_out = [task.batch(i, batch, salt=1) for i in range(batches)]
    scores = trainer.evaluate_batches(model, held_out)
    records.append(dict(
        setting=setting, layers=base.layer_letters(model_config.layer_kinds),
        seed=seed, train_pairs=config.task.num_kv_pairs, num_kv_pairs=pairs, seq_len=4 * pairs,
        vocab_size=config.task.vocab_size, steps=config.num_steps, sequences=batches * batch,
        per_query_accuracy=scores["token_accuracy"], exact_match=scores["accuracy"],
        cache_bytes=flops.cache_bytes(model_config, 4 * pairs)))
  return records


def run(ctx: base.Context) -> base.Result:
  settings = QUICK_SETTINGS if ctx.quick else SETTINGS
  records = grids.run_settings(ctx, settings, lambda s, d: make_config(ctx, s, d),
                               lambda w, s, d: measure(ctx, w, s, d))
  accuracy = grids.seed_table(records, "num_kv_pairs", "setting", "per_query_accuracy",
                              "key-value pairs", mean_row=False)
  exact = grids.seed_table(records, "num_kv_pairs", "setting", "exact_match",
                           "key-value pairs", mean_row=False)
  first = records[0]
  layers = ", ".join(f"{s} {next(r['layers'] for r in records if r['setting'] == s)}"
                     for s in settings)
  memory = base.markdown_table(
      ["key-value pairs (tokens)"] + list(settings),
      [[f"{p} ({4 * p})"] + [f"{_cache(records, s, p) / 1024:.1f}" for s in settings]
       for p in sorted({r["num_kv_pairs"] for r in records})])
  note = (f"Trained at {first['train_pairs']} pairs / {4 * first['train_pairs']} tokens "
          f"({first['steps']} steps), scored at each size with seq_len = 4 x pairs, vocabulary "
          f"{first['vocab_size']}, {first['sequences']} held-out sequences per cell; layers: "
          f"{layers}; mean (min-max) over {grids.seeds_note(records)}.")
  markdown = (f"Per-query accuracy:\n\n{accuracy}\n\nExact match (every query of a sequence "
              f"right):\n\n{exact}\n\nDecode cache per sequence (KiB, `models.flops."
              f"cache_bytes`) at that length:\n\n{memory}\n\n{note}")
  plot = lambda path: grids.plot_by(records, "num_kv_pairs", "per_query_accuracy", path,
                                    xlabel="key-value pairs (seq_len = 4 x pairs)",
                                    ylabel="MQAR per-query accuracy",
                                    title="Recall vs state (trained at "
                                          f"{first['train_pairs']} pairs)")
  return base.Result(records, markdown, plot)


def _cache(records, setting: str, pairs: int) -> int:
  return next(r["cache_bytes"] for r in records
              if r["setting"] == setting and r["num_kv_pairs"] == pairs)


ROW = base.Row(number=7, name="recall_state", title="Recall vs state (MQAR, gdn and hybrids)",
               columns=COLUMNS, run=run)
