r"""Export a training run as a Hugging Face directory (config.json, safetensors, tokenizer).

    python -m experiments.export --workdir=/tmp/llama_yarn --out=/tmp/llama_yarn_hf

Loads `config.json` and the latest checkpoint of `--workdir` (`--step` for another) and writes
what transformers' `from_pretrained` loads with the same logits (`models.hf.save`): the same
architecture as the checkpoint the run started from (`init_from`), else the first family that
can express the model; the run's tokenizer files are copied next to it. `--out` must not exist
(nothing is overwritten; the directory appears only when complete).
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments.evaluation import runs
from experiments.training import checkpoints as ckpt_lib
from experiments.training import cli, hf_bridge
from experiments.training import workdir as workdir_lib

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    with workdir_lib.lock(FLAGS.workdir, shared=True):
      config, model, step = runs.load_run(FLAGS.workdir, step=FLAGS.step or None)
      architecture = hf_bridge.export(model, config, FLAGS.out)
  except (FileExistsError, FileNotFoundError, ValueError, workdir_lib.WorkdirError,
          ckpt_lib.CheckpointError) as e:
    sys.exit(f"error: {e}")
  print(f"wrote {FLAGS.out}: {architecture} at step {step} of {FLAGS.workdir}")


def define_flags() -> None:
  """The command-line flags (defined when run as a script or by a test)."""
  flags.DEFINE_string("workdir", None, "A training run's workdir (config.json + checkpoints).")
  flags.DEFINE_string("out", None, "The Hugging Face directory to write (must not exist).")
  flags.DEFINE_integer("step", 0, "The checkpoint step to export (0 = the latest).")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main, flags_parser=cli.parse_flags)
