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
refused unless `--overwrite`. Holds the workdir's shared lock (experiments/training/workdir.py): it may
run next to another evaluation, not next to a training run writing the same workdir.

An MLM run's task is `mlm_needle` (`eval_mlm_needle[_<tag>].csv/.png`): exact match of a
masked key-value needle's value by the distance to its intact copy, in doubling buckets.
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments.evaluation import runs
from experiments.training import checkpoints as ckpt_lib
from experiments.training import cli
from experiments.training import workdir as workdir_lib

FLAGS = flags.FLAGS


def main(argv):
  del argv
  try:
    runs.run(FLAGS.workdir, outdir=FLAGS.outdir, task_names=FLAGS.tasks,
             length_multiples=FLAGS.length_multiples, lengths=FLAGS.lengths,
             depths=FLAGS.depths, examples=FLAGS.examples, rope_scaling=FLAGS.rope_scaling,
             rope_factor=FLAGS.rope_factor, tag=FLAGS.tag, overwrite=FLAGS.overwrite,
             check_rows=FLAGS.check_generate)
  except (FileExistsError, FileNotFoundError, workdir_lib.WorkdirError,
          ckpt_lib.CheckpointError, ValueError) as e:
    sys.exit(f"error: {e}")


def define_flags() -> None:
  """The command-line flags (defined when run as a script or by a test)."""
  flags.DEFINE_string("workdir", None, "A training run's workdir (config.json + checkpoints).")
  flags.DEFINE_string("outdir", None, "Where CSV/PNG go (default: --workdir).")
  flags.DEFINE_list("tasks", None, "Haystack tasks: passkey, needle; mlm_needle for MLM runs "
                    "(default: config.eval).")
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
