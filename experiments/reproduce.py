r"""Reproduces experiments/results/: one command per row, CSV + PNG per row, one summary table.

    python -m experiments.reproduce --rows=1,3 --workdir=/tmp/longctx_results
    python -m experiments.reproduce --quick --workdir=/tmp/q   # every row in seconds (tests)

Each row (experiments/rows/*.py, listed in `rows.runner.ROWS`) trains its models under
`<workdir>/<row name>/` (resumable: rerun the same command after a kill) and reports every
cell over `--seeds`. Outputs go to `--out` (default `experiments/results/` for full runs, the
committed figures; `<workdir>/results/` with `--quick`): `<row>.csv`, `<row>.png`, `<row>.md`
and `summary.md` (`summary_quick.md`): every row's table, seeds, CPU and wall minutes (CPU:
each training run's own, recorded by `rows.base.train_run` wherever it ran, plus the
measuring done by these calls; wall: these calls', which count runs trained by other processes
as nothing and parallel ones twice).
"""

from __future__ import annotations

import os

from absl import app, flags

from experiments.rows import runner
from experiments.training import cli

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    rows = runner.parse_rows(FLAGS.rows)
    seeds = tuple(int(s) for s in FLAGS.seeds.split(","))
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  out = FLAGS.out or (os.path.join(FLAGS.workdir, "results") if FLAGS.quick
                      else runner.RESULTS_DIR)
  runner.run_rows(rows, FLAGS.workdir, out, FLAGS.quick, seeds)


def define_flags() -> None:
  """The command-line flags (defined when run as a script or by a test)."""
  flags.DEFINE_string("rows", "all", "Rows to run: comma-separated numbers or names, or all.")
  flags.DEFINE_string("workdir", "/tmp/longctx_results", "Training runs and caches go here.")
  flags.DEFINE_bool("quick", False, "Every row shrunk to seconds (the suite runs this).")
  flags.DEFINE_string("seeds", "0,1,2", "Training seeds; every cell is reported over them.")
  flags.DEFINE_string("out", None, "CSV/PNG/summary directory (default: experiments/results, "
                      "or <workdir>/results with --quick).")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
