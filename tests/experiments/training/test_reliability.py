"""What a training run survives (experiments/training/stops.py): divergence, a failed
checkpoint write, a stop signal, SIGKILL at random points; each through `python -m
experiments.train` (in this process, or as real subprocesses) with `passkey.py:smoke`."""

import errno
import json
import os
import re
import signal

import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import soak, train
from experiments.configs import passkey
from experiments.training import checkpoints, loop, stops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
SMOKE = os.path.join(ROOT, "experiments", "configs", "passkey.py") + ":smoke"
STEPS = 6


def run_main(workdir, **overrides):
  """`python -m experiments.train` (past its flags) in this process; returns its exit code."""
  config = passkey.get_config("smoke")
  config.update(eval_after_train=False, log_every=1, **overrides)
  try:
    train.run(config, workdir)
    return 0
  except SystemExit as e:
    return e.code


def strict_rows(workdir, whole_lines_only=False):
  """`<workdir>/metrics.jsonl` parsed as strict JSON (NaN / Infinity are errors)."""
  def reject(name):
    raise ValueError(f"non-JSON constant {name} in metrics.jsonl")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    text = f.read()
  lines = text.splitlines(keepends=True)
  return [json.loads(line, parse_constant=reject) for line in lines
          if not whole_lines_only or line.endswith("\n")]


def trainer_model():
  from experiments.training import trainer  # pylint: disable=g-import-not-at-top
  return trainer.make_model(passkey.get_config("smoke"))


def last_line(text):
  return text.strip().splitlines()[-1]


def test_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, capsys):
  """lr=1e6 (the loss is NaN from step 3 or 4), 6 steps, checkpoints every 2, 2 kept: before,
  the run trained on through NaN, exited 0 and rotation left only NaN checkpoints."""
  workdir = str(tmp_path)
  code = run_main(workdir, num_steps=STEPS, checkpoint_every=2, max_to_keep=2,
                  optim=dict(passkey.get_config("smoke").optim, lr=1e6))
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
  args = dict(num_steps=STEPS, checkpoint_every=2, max_to_keep=1)
  code = run_main(workdir, **args)
  err = capsys.readouterr().err
  assert code == stops.WriteFailed.exit_code == 74, err[-2000:]
  line = last_line(err)
  path = os.path.join(workdir, "checkpoints", "4")
  assert line.startswith(f"error: cannot write checkpoint 4 to {path} (OSError: ") and (
      "newest kept checkpoint is step 2" in line), line
  assert checkpoints.load_params(trainer_model(), workdir) == 2  # max_to_keep=1: not rotated out
  monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", real_save)
  real_restore, restored = checkpoints.Checkpoints.restore, []

  def spy(self, *args, **kwargs):
    meta = real_restore(self, *args, **kwargs)
    restored.append(None if meta is None else meta["step"])
    return meta

  monkeypatch.setattr(checkpoints.Checkpoints, "restore", spy)
  assert run_main(workdir, **args) == 0  # the same command: resumes from step 2
  assert restored == [2]
  assert [r["step"] for r in strict_rows(workdir)] == list(range(1, STEPS + 1))
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(STEPS)]


def test_stop_signals_set_a_flag_until_the_block_ends():
  before = {sig: signal.getsignal(sig) for sig in stops.SIGNALS}
  with stops.StopSignals() as signals:
    assert not signals.agreed()
    os.kill(os.getpid(), signal.SIGUSR1)  # handled between bytecodes: the process lives on
    assert signals.agreed() and signals.received == "SIGUSR1"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C does not wait for the step
  assert {sig: signal.getsignal(sig) for sig in stops.SIGNALS} == before


def test_stop_settings_are_checked_before_training(tmp_path):
  for name in ("max_nonfinite_steps", "heartbeat_timeout_s"):
    config = passkey.get_config("smoke")
    config[name] = 0
    with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
      loop.setup(config, str(tmp_path))


def test_metrics_are_strict_json_and_a_torn_last_line_is_dropped(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  log = loop.MetricsLog(path, 0)
  log.write(dict(step=1, loss=float("nan"), grad_norm=float("inf"), skipped_steps=1))
  log.write(dict(step=2, loss=1.5, skipped_steps=1))
  log.close()
  with open(path, "a") as f:
    f.write('{"step": 3, "loss": 1.')  # killed while appending
  assert strict_rows(tmp_path, whole_lines_only=True) == [
      dict(step=1, loss=None, grad_norm=None, skipped_steps=1),
      dict(step=2, loss=1.5, skipped_steps=1)]
  assert [r["step"] for r in loop.read_metrics(path)] == [1, 2]
  loop.MetricsLog(path, 1).close()  # resumed from step 1: the file is rewritten, whole lines
  assert strict_rows(tmp_path) == [dict(step=1, loss=None, grad_norm=None, skipped_steps=1)]


# --- real subprocesses: a stop signal, then SIGKILL at random points ---------------------------

TRAIN_ARGS = (f"--config={SMOKE}", f"--config.num_steps={2 * STEPS}", "--config.max_to_keep=2",
              "--config.checkpoint_every=3")


@pytest.mark.slow
def test_stop_signal_and_sigkills_then_the_same_command_ends_equal_to_a_straight_run(tmp_path):
  """`experiments.soak` at a tiny size: SIGTERM mid-run (the step it stops at is saved, exit
  75), then SIGKILL at a random point, then the same command runs to the end: its metrics
  (each step once) and parameters equal the uninterrupted run's."""
  signals = [signal.SIGTERM, signal.SIGKILL]
  result = soak.soak(TRAIN_ARGS, str(tmp_path), 2 * STEPS, signals, seed=1, max_delay=0.2)
  stopped, *killed = result["events"]
  assert stopped["returncode"] == stops.Preempted.exit_code == 75, stopped
  match = re.fullmatch(rf"stopped: stopped by SIGTERM after step (\d+) of {2 * STEPS}: saved "
                       rf"checkpoint \1 in \S+; run the same command again to resume\.",
                       stopped["message"])
  assert match and stopped["target"] <= int(match[1]) < 2 * STEPS, stopped
  assert int(match[1]) in stopped["checkpoints"], stopped
  codes = [e["returncode"] for e in killed]  # 0: it ended before the kill (at the last step)
  assert -signal.SIGKILL in codes and set(codes) <= {-signal.SIGKILL, 0}, result
  assert result["differences"] == [], result
