"""train.py end to end with `passkey.py:smoke`: files, resume, determinism, bad input."""

import hashlib
import json
import os

from absl import flags
import numpy as np
import pytest

from experiments import checkpoints, train
from experiments.configs import common, passkey

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(ROOT, "experiments", "configs", "passkey.py") + ":smoke"


def smoke(**overrides):
  config = passkey.get_config("smoke")
  config.eval_after_train = False
  config.update(overrides)
  return config


def metrics(workdir):
  return train.read_metrics(os.path.join(workdir, "metrics.jsonl"))


def tree_digest(directory):
  digest = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for name in sorted(files):
      path = os.path.join(root, name)
      digest.update(path.encode())
      with open(path, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A 4-step smoke run (with the evaluation grid) through main(), as from the command line."""
  workdir = str(tmp_path_factory.mktemp("run"))
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["train", f"--config={SMOKE}", f"--workdir={workdir}"])
  try:
    train.main(["train"])
  finally:
    flags.FLAGS.unparse_flags()
  return workdir


def test_smoke_run_writes_everything(finished_run):
  for name in ("config.json", "metrics.jsonl", "loss.png", "eval_passkey.csv", "eval_passkey.png"):
    assert os.path.getsize(os.path.join(finished_run, name)) > 0, name
  assert sorted(os.listdir(os.path.join(finished_run, "checkpoints"))) == ["2", "4"]
  rows = metrics(finished_run)
  assert [r["step"] for r in rows] == [2, 4]
  assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in rows)
  assert "accuracy" in rows[-1]
  with open(os.path.join(finished_run, "config.json")) as f:
    assert json.load(f)["task"]["name"] == "passkey"


def test_kill_and_resume_equals_a_straight_run(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train(smoke(num_steps=4, log_every=1), straight)
  first = train.train(smoke(num_steps=4, log_every=1), resumed, stop_at_step=2)  # "killed"
  assert first["step"] == 2 and sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["2"]
  second = train.train(smoke(num_steps=4, log_every=1), resumed)  # same command again
  assert second["step"] == 4
  steps = [r["step"] for r in metrics(resumed)]
  assert steps == [1, 2, 3, 4]  # continued from step 2, no re-initialisation
  np.testing.assert_allclose([r["loss"] for r in metrics(resumed)],
                             [r["loss"] for r in metrics(straight)], rtol=0, atol=1e-5)


def test_unknown_config_field_is_a_clear_error(tmp_path):
  config = smoke()
  config.unlock()
  config.optim.learning_rat = 0.1
  with pytest.raises(ValueError, match=r"unknown config field.*optim\.learning_rat"):
    train.train(config, str(tmp_path))
  assert not os.listdir(tmp_path)
  flags.FLAGS.unparse_flags()
  with pytest.raises(flags.Error, match="config.nope"):
    flags.FLAGS(["train", f"--config={SMOKE}", f"--workdir={tmp_path}", "--config.nope=1"])
  flags.FLAGS.unparse_flags()


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(train.WorkdirError, match="not writable"):
    train.train(smoke(), str(blocker / "run"))
  if os.geteuid() != 0:  # root ignores permission bits
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(train.WorkdirError, match="not writable"):
      train.train(smoke(), str(locked / "run"))


def test_incompatible_checkpoint_is_refused_untouched(finished_run):
  before = tree_digest(finished_run)
  with pytest.raises(checkpoints.CheckpointError, match=r"(?s)different model.*d_model.*new --workdir"):
    train.train(smoke(num_steps=8, model=dict(passkey.get_config("smoke").model,
                                                  d_model=48)), finished_run)
  assert tree_digest(finished_run) == before


def test_corrupt_checkpoint_is_refused_untouched(finished_run, tmp_path):
  import shutil
  workdir = str(tmp_path / "copy")
  shutil.copytree(finished_run, workdir)
  model_dir = os.path.join(workdir, "checkpoints", "4", "model")
  for root, _, files in os.walk(model_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  before = tree_digest(workdir)
  with pytest.raises(checkpoints.CheckpointError, match="corrupt"):
    train.train(smoke(num_steps=8), workdir)
  assert tree_digest(workdir) == before


def test_init_from_loads_weights_for_context_extension(finished_run, tmp_path):
  from experiments import trainer
  from flax import nnx
  config = smoke()
  source = trainer.make_model(config)
  checkpoints.load_params(source, finished_run)
  extended = trainer.make_model(config, rope_scaling="yarn", rope_factor=2.0,
                                rope_original_length=config.task.seq_len)
  assert checkpoints.load_params(extended, finished_run) == 4
  for a, b in zip(*(jax_leaves(nnx.state(m, nnx.Param)) for m in (source, extended))):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(checkpoints.CheckpointError, match="no checkpoints|no checkpoint steps"):
    checkpoints.load_params(extended, str(tmp_path / "missing"))


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_base_config_has_every_field_the_configs_use():
  common.check_config(passkey.get_config())
  common.check_config(passkey.get_config("smoke"))


@pytest.mark.parametrize("name", ["mqar", "text"])
def test_other_task_configs_train(name, tmp_path):
  import importlib
  config = importlib.import_module(f"experiments.configs.{name}").get_config("smoke")
  result = train.train(config, str(tmp_path))
  assert result["step"] == config.num_steps and np.isfinite(result["loss"])
  assert 0.0 <= result["token_accuracy"] <= 1.0


def test_extend_config_starts_from_a_run(finished_run, tmp_path):
  from experiments.configs import extend
  config = extend.get_config("smoke-linear")
  config.update(init_from=finished_run, eval_after_train=False, num_steps=2)
  result = train.train(config, str(tmp_path))
  assert result["step"] == 2 and config.task.seq_len == 2 * passkey.get_config("smoke").task.seq_len
  with open(os.path.join(str(tmp_path), "config.json")) as f:
    saved = json.load(f)
  assert saved["model"]["rope_scaling"] == "linear" and saved["init_from"] == finished_run


def test_evaluate_loads_a_run_with_a_rope_override(finished_run, tmp_path):
  from experiments import evaluate
  config, model, step = evaluate.load_run(finished_run, "yarn", 2.0)
  assert step == 4 and model.config.rope_scaling == "yarn"
  assert model.config.rope_original_length == config.task.seq_len
  assert evaluate.check_generate(model, config, "passkey", config.task.seq_len, 2) == 1.0
  rows = evaluate.evaluate_and_report(model, config, str(tmp_path), task_names=["needle"],
                                      lengths=[160, 256], depths=[0.5], examples=2, tag="yarn")
  assert [(r["length"], r["depth"]) for r in rows["needle"]] == [(160, 0.5), (256, 0.5)]
  assert (tmp_path / "eval_needle_yarn.csv").exists() and (tmp_path / "eval_needle_yarn.png").exists()
