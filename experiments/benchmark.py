r"""Benchmarks: exact compiled memory/FLOPs and paired wall-time ratios, by preset.

    python -m experiments.benchmark --workdir=/tmp/longctx_bench          # the attention table
    python -m experiments.benchmark --preset=acceptance --workdir=/tmp/longctx_bench
    python -m experiments.benchmark --preset=dsa_decode                  # or dsa_fp8

The presets are `experiments/bench/presets.py` (`--helpfull` lists them); the attention table
is `experiments/bench/attention_bench.py` (its docstring says what each column measures).
Writes `benchmark.csv` and `benchmark.png` under `--workdir` and prints the tables.
"""

from __future__ import annotations

from absl import app, flags

from experiments.bench import attention_bench, presets
from experiments.training import cli

FLAGS = flags.FLAGS
SETTINGS_FLAGS = {  # attention_bench.Settings fields with their integer flags
    "window": "Local attention window (the last `window` keys).",
    "batch": "Batch size.", "heads": "Query heads.",
    "kv_heads": "KV heads (GQA); default = heads.", "head_dim": "Head dimension.",
    "repeats": "Timed repeats (median reported) after one warm-up.",
    "quadratic_max_len": "Dense methods are not compiled beyond this.",
    "time_max_len": "Forward is timed up to this length.",
    "time_bwd_max_len": "Forward+backward is timed up to this length.",
    "quadratic_time_max_len": "Dense methods are timed up to this length.",
}
FLAG_NAMES = ("workdir", "preset", "methods", "lengths", "causal", "dtype", *SETTINGS_FLAGS)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  values = {name: FLAGS[name].value for name in FLAG_NAMES}
  explicit = frozenset(name for name in FLAG_NAMES if FLAGS[name].present)
  try:
    presets.run(FLAGS.preset, values, explicit)
  except ValueError as e:
    raise app.UsageError(str(e)) from e


def define_flags() -> None:
  """The command-line flags (defined when run as a script or by a test)."""
  flags.DEFINE_string("workdir", "/tmp/longctx_benchmark",
                      "Where benchmark.csv/.png are written.")
  flags.DEFINE_enum("preset", "default", sorted(presets.PRESETS), "; ".join(
      f"{name}: {p.help}" for name, p in sorted(presets.PRESETS.items())))
  flags.DEFINE_list("methods", ["jax", "dense", "flash", "local"],
                    "Methods (keys of attention_bench.METHODS): jax "
                    "(jax.nn.dot_product_attention), or registered names.")
  flags.DEFINE_list("lengths", ["1024", "4096", "8192", "32768"], "Sequence lengths.")
  flags.DEFINE_list("causal", ["true"],
                    "Causal settings to sweep (true/false); local is always causal.")
  settings = attention_bench.Settings
  flags.DEFINE_enum("dtype", settings.dtype, ["float32", "bfloat16", "float16"], "Input dtype.")
  for name, meaning in SETTINGS_FLAGS.items():
    flags.DEFINE_integer(name, getattr(settings, name), meaning)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
