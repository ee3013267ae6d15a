r"""Train a model on an offline task; resumes automatically from `--workdir`/checkpoints.

    python -m experiments.train --workdir=/tmp/longctx_passkey      # configs/passkey.py
    python -m experiments.train --config=experiments/configs/passkey.py --workdir=/tmp/passkey
    python -m experiments.train --config=experiments/configs/mqar.py:smoke --workdir=/tmp/m \
        --config.num_steps=50 --config.model.d_model=128
    python -m experiments.train --config=experiments/configs/mqar.py --print_config  # all fields

Writes under `--workdir`: `config.json`, `metrics.jsonl` (one JSON line per logged step),
`checkpoints/` (orbax), `loss.png`, `train.log`; with `config.eval_after_train`, also the
evaluation grid (`eval_<task>.csv`, `eval_<task>.png`) and the printed accuracy table. A run
that is killed and started again with the same command continues from its last checkpoint with
the same data order. The loop is `experiments.training.loop.train`; the safety rules of a
workdir (lock, corrupt checkpoints, refused config changes) are in its docstring. Expected
errors print one line; their traceback goes to `train.log`.

Exit codes (`experiments/training/stops.py`): 0 done; 1 an error (one line); 2 a bad flag or
config field; 3 diverged (`max_nonfinite_steps` non-finite steps in a row, none applied, every
checkpoint finite); 74 a checkpoint or metrics write failed (older checkpoints intact); 75
stopped by SIGTERM, SIGINT or SIGUSR1 after checkpointing the step in flight. After 74 or 75,
the same command resumes exactly where the run stopped.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import evaluation
from experiments.configs import common
from experiments.training import checkpoints as ckpt_lib
from experiments.training import cli, stops
from experiments.training import workdir as workdir_lib

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "passkey.py")
FLAGS = flags.FLAGS

# Errors of a bad command or workdir: one message on the console, the traceback in train.log.
EXPECTED_ERRORS = (ValueError, workdir_lib.WorkdirError, ckpt_lib.CheckpointError,
                   FileExistsError)


class QuietLibraries:
  """Drops other libraries' INFO lines (orbax logs every checkpoint step); keeps warnings."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}; set fields with --config.x=y.")
  if FLAGS.print_config:
    print(common.describe_fields(FLAGS.config))
    return
  logging.get_absl_handler().addFilter(QuietLibraries())
  run(FLAGS.config, FLAGS.workdir)


def run(config, workdir: str | None) -> None:
  """What the command does once its flags are read: train and evaluate into `workdir`; an
  expected error or early stop prints one line and exits with its code (see above)."""
  try:
    workdir = workdir_lib.prepare(workdir)
    handler = workdir_lib.log_to_file(workdir)
    try:
      result = evaluation.train_and_evaluate(config, workdir)
    finally:
      workdir_lib.stop_logging(handler)
  except stops.RunStopped as e:  # preempted, diverged, a failed write: one line, its exit code
    workdir_lib.log_exception(workdir, e)
    print(f"{e.label}: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  except EXPECTED_ERRORS as e:
    log = workdir_lib.log_exception(workdir, e)
    sys.exit(f"error: {e}" + (f"\n(traceback in {log})" if log else ""))
  logging.info("Done: %s", {k: v for k, v in result.items() if k != "eval"})


def define_flags() -> None:
  """The command-line flags (defined once: when run as a script, or by a test)."""
  if "config" in FLAGS:
    return
  config_flags.DEFINE_config_file(
      "config", DEFAULT_CONFIG, "Experiment config file[:variant] (default: configs/passkey.py;"
      " variants: experiments/configs/common.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for everything the run writes.")
  flags.DEFINE_bool("print_config", False, "Print every config field (value, meaning) and exit.")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
