"""What a training run survives (experiments/training/stops.py): divergence, a failed
checkpoint write, a stop signal, SIGKILL at random points; each through `python -m
experiments.train` (in this process, or as real subprocesses) with `passkey.py:smoke`."""

import errno
import json
import os
import re
import signal

from absl import flags
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import soak, train
from experiments.training import checkpoints, stops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
SMOKE = os.path.join(ROOT, "experiments", "configs", "passkey.py") + ":smoke"
STEPS = 6


def run_main(workdir, *overrides):
  """`python -m experiments.train` in this process; returns its exit code."""
  train.define_flags()
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["train", f"--config={SMOKE}", f"--workdir={workdir}",
               "--config.eval_after_train=False", "--config.log_every=1", *overrides])
  try:
    train.main(["train"])
    return 0
  except SystemExit as e:
    return e.code
  finally:
    flags.FLAGS.unparse_flags()


def strict_rows(workdir):
  """metrics.jsonl parsed as strict JSON (NaN / Infinity are errors)."""
  def reject(name):
    raise ValueError(f"non-JSON constant {name} in metrics.jsonl")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line, parse_constant=reject) for line in f]


def trainer_model():
  from experiments.configs import passkey  # pylint: disable=g-import-not-at-top
  from experiments.training import trainer  # pylint: disable=g-import-not-at-top
  return trainer.make_model(passkey.get_config("smoke"))


def last_line(text):
  return text.strip().splitlines()[-1]


def test_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, capsys):
  """The issue's scenario: lr=1e6, 6 steps, checkpoints every 2, 2 kept."""
  workdir = str(tmp_path)
  code = run_main(workdir, "--config.optim.lr=1e6", f"--config.num_steps={STEPS}",
                  "--config.checkpoint_every=2", "--config.max_to_keep=2")
  err = capsys.readouterr().err
  assert code == stops.Diverged.exit_code == 3, err[-2000:]
  line = last_line(err)
  assert line.startswith("error: training diverged: steps ") and "3 in a row" in line, line
  assert f"last good checkpoint is step 2 ({workdir}/checkpoints/2)" in line, line
  # Only finite checkpoints exist; the one at a skipped step was put off, none rotated out.
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
  assert checkpoints.load_params(trainer_model(), workdir) == 2
  rows = strict_rows(workdir)
  skipped = [r["skipped_steps"] for r in rows]
  assert skipped[-3:] == [1, 2, 3] and skipped[0] == 0, rows
  assert any(r["grad_norm"] is None or r["loss"] is None for r in rows[-3:]), rows


def test_failed_checkpoint_write_keeps_older_ones_and_resumes(tmp_path, capsys, monkeypatch):
  workdir = str(tmp_path)
  real_save, calls = ocp.JsonCheckpointHandler.async_save, []

  async def disk_full_at_second_save(self, directory, *args, **kwargs):
    calls.append(str(directory))
    if len(calls) == 2:
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await real_save(self, directory, *args, **kwargs)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", disk_full_at_second_save)
  args = (f"--config.num_steps={STEPS}", "--config.checkpoint_every=2", "--config.max_to_keep=1")
  code = run_main(workdir, *args)
  err = capsys.readouterr().err
  assert code == stops.WriteFailed.exit_code == 74, err[-2000:]
  line = last_line(err)
  path = os.path.join(workdir, "checkpoints", "4")
  assert line.startswith(f"error: cannot write checkpoint 4 to {path} (OSError: ") and (
      "newest kept checkpoint is step 2" in line), line
  assert checkpoints.load_params(trainer_model(), workdir) == 2  # max_to_keep=1: not rotated out
  monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", real_save)
  assert run_main(workdir, *args) == 0  # the same command: resumes from step 2
  assert "Resumed from step 2" in capsys.readouterr().err
  assert [r["step"] for r in strict_rows(workdir)] == list(range(1, STEPS + 1))
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(STEPS)]


# --- real subprocesses: a stop signal, SIGKILL soak ----------------------------------------------

TRAIN_ARGS = (f"--config={SMOKE}", f"--config.num_steps={STEPS}", "--config.max_to_keep=2")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """The uninterrupted run the interrupted ones must equal (checkpoints every 2 steps)."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  soak.run_to_end(soak.train_command([*TRAIN_ARGS, "--config.checkpoint_every=2"], workdir), 600)
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_stop_signal_checkpoints_its_step_and_the_rerun_resumes_exactly(sig, straight_run,
                                                                        tmp_path):
  """A signal mid-run, with no periodic checkpoint before the end: the step it stops at is
  saved, the exit code is 75, and the same command then ends equal to the straight run."""
  args = [*TRAIN_ARGS, "--config.checkpoint_every=1000"]
  result = soak.soak(args, str(tmp_path), STEPS, kills=1, seed=1, sig=sig, max_delay=0.2,
                     straight=straight_run)
  (event,) = result["events"]
  assert event["returncode"] == stops.Preempted.exit_code == 75, event
  match = re.fullmatch(rf"stopped: stopped by {sig.name} after step (\d+) of {STEPS}: saved "
                       rf"checkpoint \1 in (\S+); run the same command again to resume\.",
                       event["message"])
  assert match and int(match[1]) >= event["target"], event
  assert int(match[1]) < STEPS and os.path.isdir(os.path.join(match[2], match[1])), event
  assert result["differences"] == [], result


@pytest.mark.slow
def test_sigkill_soak_loses_and_duplicates_nothing(straight_run, tmp_path):
  args = [*TRAIN_ARGS, "--config.checkpoint_every=2"]
  result = soak.soak(args, str(tmp_path), STEPS, kills=2, seed=0, max_delay=0.2,
                     straight=straight_run)
  assert [e["returncode"] for e in result["events"]] == [-signal.SIGKILL] * 2, result
  assert result["differences"] == [], result
