r"""Crash-consistency soak: kill a training run at random points, restart it, compare.

    python -m experiments.soak --config=experiments/configs/passkey.py:smoke --workdir=/tmp/soak \
        --kills=5 --config.num_steps=12 --config.checkpoint_every=3

Trains the config (`python -m experiments.train` subprocesses, every `--config.x=y` passed on)
straight through into `<workdir>/straight`; then into `<workdir>/killed`, `--kills` times: start
the same command, let it log a random step past the last one it logged, wait a random time up to
`--max_delay` seconds more (so the kill lands anywhere: inside a step, a checkpoint write, a
metrics line) and send it the next of `--signals` (default KILL: no chance to clean up); finally
run it to the end. Then checks, and prints, that nothing was lost or duplicated: `metrics.jsonl`
holds each step once with the same values as the straight run (all but `tokens_per_s`), and the
final parameters are equal. Exits 1 on a difference. Runs log every step and write no evaluation
grid.

A run sent TERM, INT or USR1 must also exit with code 75 (stopped after checkpointing its step,
experiments/training/stops.py): `--signals=TERM,KILL` alternates stop signals and kills.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from absl import app, flags, logging
import numpy as np
from ml_collections import config_flags

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORCED = ("--config.log_every=1", "--config.progress=False", "--config.eval_after_train=False")
IGNORED = ("tokens_per_s",)  # wall-clock: differs between any two runs


def train_command(train_args: Sequence[str], workdir: str) -> list[str]:
  """`python -m experiments.train ARGS --workdir=WORKDIR` with every step logged."""
  return [sys.executable, "-m", "experiments.train", *train_args, *FORCED,
          f"--workdir={workdir}"]


def logged_steps(workdir: str) -> list[int]:
  """The steps in `<workdir>/metrics.jsonl` so far (a torn last line ignored)."""
  steps = []
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        try:
          steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
          pass
  except FileNotFoundError:
    pass
  return steps


def environment() -> dict[str, str]:
  """This process's environment, with this checkout first on PYTHONPATH."""
  path = os.environ.get("PYTHONPATH")
  return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, path) if p))


def run_to_end(command: list[str], timeout: float) -> None:
  proc = subprocess.run(command, env=environment(), capture_output=True, text=True,
                        timeout=timeout)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")


def kill_at_random(command: list[str], workdir: str, num_steps: int, rng: random.Random,
                   sig: signal.Signals, max_delay: float, timeout: float) -> dict[str, Any]:
  """Starts `command`, waits for a random step past the last logged one (+ a random delay),
  sends `sig`; returns what happened (the `step` logged when it was sent, `returncode`,
  stderr's last line, the `checkpoints` steps on disk after it)."""
  last = max(logged_steps(workdir), default=0)
  target = rng.randint(last + 1, max(last + 1, num_steps - 1))
  err = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would stall the run
  proc = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=err,
                          text=True)
  deadline = time.time() + timeout
  while proc.poll() is None and max(logged_steps(workdir), default=0) < target:
    if time.time() > deadline:
      proc.kill()
      raise RuntimeError(f"no step {target} within {timeout} s: {' '.join(command)}")
    time.sleep(0.02)
  time.sleep(rng.uniform(0.0, max_delay))
  seen = max(logged_steps(workdir), default=0)
  if proc.poll() is None:
    proc.send_signal(sig)
  proc.wait(timeout=timeout)
  err.seek(0)
  lines = err.read().strip().splitlines()
  err.close()
  directory = os.path.join(workdir, "checkpoints")
  steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
  return dict(signal=sig.name, target=target, step=seen, returncode=proc.returncode,
              message=lines[-1] if lines else "", checkpoints=steps)


def compare(straight: str, killed: str) -> list[str]:
  """The differences between the two workdirs' metrics and final parameters (empty: equal)."""
  from experiments.evaluation import runs  # pylint: disable=g-import-not-at-top
  from experiments.training import loop  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  rows = [loop.read_metrics(os.path.join(w, "metrics.jsonl")) for w in (straight, killed)]
  out = []
  steps = [[r["step"] for r in rs] for rs in rows]
  if steps[0] != steps[1]:
    out.append(f"metrics steps differ: straight {steps[0]}, killed {steps[1]}")
  for a, b in zip(*rows):
    for key in sorted((set(a) | set(b)) - set(IGNORED)):
      if a.get(key) != b.get(key):
        out.append(f"step {a['step']}: {key} {a.get(key)!r} (straight) != {b.get(key)!r}")
  params = []
  for workdir in (straight, killed):
    _, model, step = runs.load_run(workdir)
    params.append((step, jax.tree.leaves(nnx.state(model, nnx.Param))))
  if params[0][0] != params[1][0]:
    out.append(f"final checkpoint steps differ: {params[0][0]} != {params[1][0]}")
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(params[0][1], params[1][1]))
  if diff:
    out.append(f"final parameters differ by up to {diff:.3g}")
  return out


def soak(train_args: Sequence[str], workdir: str, num_steps: int,
         signals: Sequence[signal.Signals], seed: int = 0, max_delay: float = 0.5,
         timeout: float = 600, straight: str | None = None) -> dict[str, Any]:
  """The straight run, a run stopped by each of `signals` in turn and restarted, the final
  run; their comparison. `straight`: a finished straight run's workdir to compare with (made
  here if None)."""
  killed = os.path.join(workdir, "killed")
  if straight is None:
    straight = os.path.join(workdir, "straight")
    run_to_end(train_command(train_args, straight), timeout)
  rng = random.Random(seed)
  events = [kill_at_random(train_command(train_args, killed), killed, num_steps, rng, sig,
                           max_delay, timeout) for sig in signals]
  run_to_end(train_command(train_args, killed), timeout)
  return dict(events=events, differences=compare(straight, killed))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore of the comparison
  train_args = [a for a in sys.argv[1:] if a.startswith("--config")]
  names = [n.strip().upper().removeprefix("SIG") for n in FLAGS.signals.split(",")]
  cycle = [signal.Signals["SIG" + n] for n in names]
  signals = [cycle[i % len(cycle)] for i in range(FLAGS.kills)]
  result = soak(train_args, FLAGS.workdir, FLAGS.config.num_steps, signals, FLAGS.seed,
                FLAGS.max_delay)
  for event in result["events"]:
    print(f"{event['signal']} at step {event['step']}: exit {event['returncode']}")
  for line in result["differences"]:
    print(f"DIFFERENT: {line}")
  wrong = [e for e in result["events"]
           if e["signal"] != "SIGKILL" and e["returncode"] not in (0, 75)]
  if result["differences"] or wrong:
    sys.exit(1)
  print(f"equal: {FLAGS.kills} stops, the same metrics and parameters as the straight run")


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for the two runs (straight/, killed/).")
  flags.DEFINE_integer("kills", 5, "How many times the run is killed and restarted.")
  flags.DEFINE_integer("seed", 0, "Seed of the random kill points.")
  flags.DEFINE_float("max_delay", 0.5, "Most seconds waited after the target step.")
  flags.DEFINE_string("signals", "KILL", "Signals sent in turn (comma-separated): KILL, TERM, "
                      "INT, USR1.")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  define_flags()
  app.run(main)
