"""Two real processes on localhost (`jax.distributed`, 4 CPU devices each, gloo collectives)
training `passkey.py:smoke` on a `data:2,seq:4` mesh with ring attention, against the same run
in one 8-device process: a stop signal to one process stops both at the same step, with a
checkpoint both wrote; a 1-process run resumes it and ends equal to the 1-process straight run;
only process 0 holds the lock and writes metrics; each process writes its own log; a killed
peer ends the other process."""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from experiments import soak
from experiments.training import loop
from tests.multidevice import run_worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
SMOKE = os.path.join(ROOT, "experiments", "configs", "passkey.py") + ":smoke"
STEPS = 8
ARGS = (f"--config={SMOKE}", f"--config.num_steps={STEPS}", "--config.mesh=data:2,seq:4",
        "--config.checkpoint_every=1000", "--config.heartbeat_timeout_s=10")
TIMEOUT = 600


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def environment(devices: int, process: int | None = None, port: int | None = None):
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  env = dict(soak.environment(), JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
  if process is not None:
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(process))
  return env


def one_process_runs():
  """Worker (8 devices): the run straight into $STRAIGHT, then the resume of $SHARED, as the
  command with `ARGS` would do them (one process: the train step compiles once for both)."""
  from experiments.configs import passkey  # pylint: disable=g-import-not-at-top
  from experiments.evaluation import train_and_evaluate  # pylint: disable=g-import-not-at-top
  config = passkey.get_config("smoke")
  config.update(num_steps=STEPS, mesh="data:2,seq:4", checkpoint_every=1000,
                heartbeat_timeout_s=10, log_every=1, progress=False, eval_after_train=False)
  return [train_and_evaluate(config, os.environ[name])["step"] for name in ("STRAIGHT", "SHARED")]


def two_processes(workdir: str):
  """Both processes of a 2-host run (multihost=True), stderr to temporary files."""
  port, procs = free_port(), []
  for process in range(2):
    err = tempfile.TemporaryFile("w+")
    procs.append((subprocess.Popen([*soak.train_command(ARGS, workdir),
                                    "--config.multihost=True"],
                                   env=environment(4, process, port), stdout=subprocess.DEVNULL,
                                   stderr=err, text=True), err))
  return procs


def wait_for_step(workdir: str, step: int, procs) -> None:
  deadline = time.time() + TIMEOUT
  while max(soak.logged_steps(workdir), default=0) < step:
    assert all(p.poll() is None for p, _ in procs) and time.time() < deadline, finish(procs)
    time.sleep(0.05)


def finish(procs, timeout: float = TIMEOUT):
  """(exit code, stderr) of each process once it ends."""
  out = []
  for proc, err in procs:
    proc.wait(timeout=timeout)
    err.seek(0)
    out.append((proc.returncode, err.read()))
  return out


def params(workdir: str):
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from experiments.evaluation import runs  # pylint: disable=g-import-not-at-top
  _, model, step = runs.load_run(workdir)
  return step, [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.mark.slow
def test_two_processes_agree_checkpoint_together_and_match_one_process(tmp_path,
                                                                        monkeypatch):
  straight, shared = str(tmp_path / "straight"), str(tmp_path / "two")

  procs = two_processes(shared)
  wait_for_step(shared, 1, procs)
  with open(os.path.join(shared, ".lock")) as f:
    assert f.read().startswith(f"pid {procs[0][0].pid}:")  # process 0 holds the lock
  procs[1][0].send_signal(signal.SIGTERM)  # a signal to one process only
  results = finish(procs)
  assert [code for code, _ in results] == [75, 75], [err[-2000:] for _, err in results]
  stops = [re.search(r"^stopped: stopped by (.*) after step (\d+) ", err, re.M)
           for _, err in results]
  assert stops[0] and stops[1], results
  assert stops[1][1] == "SIGTERM" and stops[0][1] == "a peer process's signal", results
  stop = int(stops[0][2])
  assert stop == int(stops[1][2]) < STEPS, results  # both at the same step
  assert os.listdir(os.path.join(shared, "checkpoints")) == [str(stop)]
  rows = loop.read_metrics(os.path.join(shared, "metrics.jsonl"))
  assert [r["step"] for r in rows] == list(range(1, stop + 1))  # one writer: no duplicates
  logs = [(tmp_path / "two" / name).read_text() for name in ("train.log", "train.process1.log")]
  assert "stopped by SIGTERM" in logs[1] and "stopped by SIGTERM" not in logs[0], logs  # own logs

  # Two processes again, one killed mid-run: the other ends within the heartbeat timeout.
  procs = two_processes(shared)
  wait_for_step(shared, stop + 1, procs)
  procs[1][0].kill()
  killed_at = time.time()
  (code, err), _ = finish(procs, timeout=120)
  assert code != 0 and time.time() - killed_at < 120, (code, err[-2000:])  # JAX aborts it
  assert "another task died" in err or "heartbeat" in err, err[-3000:]

  # One process: the straight run, and the resume of the checkpoint the two processes wrote.
  monkeypatch.setenv("STRAIGHT", straight)
  monkeypatch.setenv("SHARED", shared)
  assert run_worker(__name__, "one_process_runs", devices=8) == [STEPS, STEPS]
  got = loop.read_metrics(os.path.join(shared, "metrics.jsonl"))
  want = loop.read_metrics(os.path.join(straight, "metrics.jsonl"))
  assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], atol=1e-5)
  (step_a, a), (step_b, b) = params(shared), params(straight)
  assert step_a == step_b == STEPS
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
