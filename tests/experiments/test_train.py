"""train.py end to end with `passkey.py:smoke`: files, resume, determinism, bad input, and
what protects a workdir (lock, checkpoint fallback, config changes, evaluate's file names)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

from absl import flags
import numpy as np
import pytest

from experiments import train
from experiments.evaluation import train_and_evaluate
from experiments.training import checkpoints, loop
from experiments.configs import common, passkey

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(ROOT, "experiments", "configs", "passkey.py") + ":smoke"


def smoke(**overrides):
  config = passkey.get_config("smoke")
  config.eval_after_train = False
  config.update(overrides)
  return config


def metrics(workdir):
  return loop.read_metrics(os.path.join(workdir, "metrics.jsonl"))


def tree_digest(directory):
  """Hash of every file but the lock and the log (which a refused run may append to)."""
  digest = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for name in sorted(set(files) - {".lock", "train.log"}):
      path = os.path.join(root, name)
      digest.update(path.encode())
      with open(path, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A 4-step smoke run (with the evaluation grid) through main(), as from the command line."""
  workdir = str(tmp_path_factory.mktemp("run"))
  train.define_flags()
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
  train_and_evaluate(smoke(num_steps=4, log_every=1), straight)
  first = train_and_evaluate(smoke(num_steps=4, log_every=1), resumed, stop_at_step=2)  # "killed"
  assert first["step"] == 2 and sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["2"]
  second = train_and_evaluate(smoke(num_steps=4, log_every=1), resumed)  # same command again
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
    train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)
  train.define_flags()  # once per process; this test must not rely on another one defining them
  flags.FLAGS.unparse_flags()
  with pytest.raises(flags.Error, match="config.nope"):
    flags.FLAGS(["train", f"--config={SMOKE}", f"--workdir={tmp_path}", "--config.nope=1"])
  flags.FLAGS.unparse_flags()


def test_kind_settings_from_the_config_take_every_field():
  """`config.model.kinds.<kind>` accepts every `KindSettings` field (ALiBi on a kind included)
  and names the known ones for an unknown field."""
  from experiments.training import trainer  # pylint: disable=g-import-not-at-top
  config = smoke()
  name = trainer.model_config(config).layer_pattern[0]
  config.model.kinds[name] = dict(alibi=True)
  assert dict(trainer.model_config(config).kinds)[name].alibi is True
  attn = trainer.make_model(config).blocks[0].attn  # ALiBi slopes, no RoPE on that kind
  assert attn.alibi_slopes is not None and attn.rope is None
  config.model.kinds[name] = dict(alibi=True, slopes=1)
  with pytest.raises(ValueError, match=r"unknown fields \['slopes'\].*'alibi'"):
    trainer.model_config(config)


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(loop.WorkdirError, match="not writable"):
    train_and_evaluate(smoke(), str(blocker / "run"))
  if os.geteuid() != 0:  # root ignores permission bits
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(loop.WorkdirError, match="not writable"):
      train_and_evaluate(smoke(), str(locked / "run"))


def test_incompatible_checkpoint_is_refused_untouched(finished_run):
  before = tree_digest(finished_run)
  wider = dict(passkey.get_config("smoke").model, d_model=48)
  with pytest.raises(loop.ConfigChangeError, match=r"model\.d_model: 32 -> 48"):
    train_and_evaluate(smoke(model=wider), finished_run)
  with pytest.raises(checkpoints.CheckpointError, match=r"(?s)different model.*d_model.*new --workdir"):
    train_and_evaluate(smoke(model=wider, allow_config_change=True), finished_run)
  assert tree_digest(finished_run) == before


def copy_run(finished_run, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(finished_run, workdir)
  return workdir


def damage(workdir, step, how):
  """Truncates (to half) or overwrites every file of checkpoint `step`'s model and optimizer."""
  for item in ("model", "opt"):
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(step), item)):
      for name in files:
        path = os.path.join(root, name)
        if how == "truncate":
          os.truncate(path, os.path.getsize(path) // 2)
        else:
          with open(path, "wb") as f:
            f.write(b"garbage")


def test_truncated_latest_checkpoint_falls_back_to_the_previous(finished_run, tmp_path, caplog):
  workdir = copy_run(finished_run, tmp_path)
  damage(workdir, 4, "truncate")
  with caplog.at_level("WARNING"):
    result = train_and_evaluate(smoke(), workdir)
  assert result["step"] == 4 and np.isfinite(result["loss"])  # steps 3-4 ran again
  lines = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
  assert len(lines) == 1 and "\n" not in lines[0], lines
  assert "checkpoint step 4 is unreadable" in lines[0] and "resuming from step 2" in lines[0]
  assert os.listdir(os.path.join(workdir, "corrupt_checkpoints")) == ["4"]  # kept, set aside
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert [r["step"] for r in metrics(workdir)] == [2, 4]
  with open(os.path.join(workdir, "train.log")) as f:
    assert "Traceback" in f.read()  # the detail went to the log


def test_no_loadable_checkpoint_is_one_error_and_untouched(finished_run, tmp_path):
  workdir = copy_run(finished_run, tmp_path)
  damage(workdir, 2, "garbage")
  damage(workdir, 4, "truncate")
  before = tree_digest(workdir)
  with pytest.raises(checkpoints.CheckpointError) as info:
    train_and_evaluate(smoke(), workdir)
  message = str(info.value)
  assert "step(s) [4, 2] are unreadable" in message and "Delete" in message, message
  assert os.path.join(workdir, "checkpoints", "4") in message and len(message) < 800
  assert tree_digest(workdir) == before


def test_resume_with_a_changed_seed_is_refused_then_recorded(finished_run, tmp_path):
  workdir = copy_run(finished_run, tmp_path)
  before = tree_digest(workdir)
  with pytest.raises(ValueError, match=r"seed: 0 -> 1.*allow_config_change"):
    train_and_evaluate(smoke(seed=1), workdir)
  assert tree_digest(workdir) == before
  train_and_evaluate(smoke(seed=1, allow_config_change=True), workdir)
  with open(os.path.join(workdir, "config_history.jsonl")) as f:
    history = [json.loads(line) for line in f]
  assert history == [dict(step=4, changes=[dict(field="seed", old=0, new=1)])]
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["seed"] == 1
  assert saved["resolved"]["layer_kinds"] == ["global", "local", "local"]  # pattern, resolved


def cli(*args, **popen):
  """`python -m experiments.<args>` from the repository root."""
  return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
def test_second_run_into_a_busy_workdir_stops_at_once(tmp_path):
  workdir = str(tmp_path / "run")
  command = ("experiments.train", f"--config={SMOKE}", f"--workdir={workdir}",
             "--config.num_steps=6", "--config.eval_after_train=False")
  first = cli(*command)
  lock = os.path.join(workdir, ".lock")
  deadline = time.time() + 300
  while not (os.path.exists(lock) and f"pid {first.pid}" in open(lock).read()):
    assert first.poll() is None and time.time() < deadline, first.communicate()
    time.sleep(0.2)
  second = cli(*command)
  _, err = second.communicate(timeout=300)
  assert second.returncode == 1 and f"pid {first.pid}" in err and "in use" in err, err
  assert len(err.strip().splitlines()) <= 3, err  # one error line (+ where the log is)
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  assert [r["step"] for r in metrics(workdir)] == [2, 4, 6]  # no duplicates


def test_unknown_field_on_the_command_line_is_one_line(tmp_path):
  result = cli("experiments.train", f"--config={SMOKE}", f"--workdir={tmp_path}",
               "--config.optim.learning_rat=0.1")
  _, err = result.communicate(timeout=300)
  assert result.returncode != 0
  assert err.strip().splitlines() == [
      "error: unknown config field optim.learning_rat (did you mean: optim.final_lr_ratio, "
      "optim.lr, optim.clip_norm?); --print_config lists every field."], err


def test_help_exits_zero_and_lists_the_config_fields(capsys):
  from experiments.training import cli as cli_lib
  train.define_flags()
  for flag in ("--help", "--helpfull"):
    with pytest.raises(SystemExit) as info:
      cli_lib.parse_flags(["train", f"--config={SMOKE}", flag])
    assert info.value.code == 0
  out = capsys.readouterr().out
  assert "--workdir" in out and "optim.lr = 0.003  # peak learning rate" in out
  flags.FLAGS.unparse_flags()


def test_every_config_field_has_a_meaning():
  paths = common.field_paths(common.base_config().to_dict())
  missing = [p for p in paths if p not in common.FIELD_HELP
             and not p.startswith(("task.", "model.kinds.", "aux_losses."))]
  assert not missing, missing


def test_one_variant_syntax():
  from experiments.configs import extend
  assert common.parse_variant("sparse,smoke", name="x", choices=("dense", "sparse")) == (
      "sparse", True)
  assert common.parse_variant(None, name="x", choices=("a",), default="a") == ("a", False)
  for bad in ("smoke-yarn", "yarn,ntk", "smoke,smoke"):
    with pytest.raises(ValueError, match="comma-separated"):
      extend.get_config(bad)
  assert extend.get_config("ntk,smoke").model.rope_scaling == "ntk"
  assert extend.get_config("smoke").model.rope_scaling == "yarn"


def test_init_from_loads_weights_for_context_extension(finished_run, tmp_path):
  from experiments.training import trainer
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



def test_init_step_loads_that_checkpoint(finished_run, tmp_path):
  """`init_from` + `init_step` start from that step's weights (DSA row 4: dense step N - n)."""
  from experiments.training import trainer
  from experiments.training import workdir as workdir_lib
  from flax import nnx
  config = smoke()
  config.update(init_from=finished_run, init_step=2)
  run = loop.setup(config, workdir_lib.prepare(str(tmp_path / "run")))
  run.ckpt.close()
  step2, latest = trainer.make_model(config), trainer.make_model(config)
  assert checkpoints.load_params(step2, finished_run, 2) == 2
  assert checkpoints.load_params(latest, finished_run) == 4
  got, want, last = (jax_leaves(nnx.state(m, nnx.Param)) for m in (run.model, step2, latest))
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(got, last))

def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_runs_with_the_same_optim_settings_share_one_transformation():
  """So `train_step` (whose jit cache key holds it) compiles once for a resume in-process."""
  from experiments.training import trainer
  model = trainer.make_model(smoke())
  first, again = (trainer.make_optimizer(model, smoke()) for _ in range(2))
  assert first.tx is again.tx
  assert trainer.make_optimizer(model, smoke(num_steps=5)).tx is not first.tx


def test_base_config_has_every_field_the_configs_use():
  common.check_config(passkey.get_config())
  common.check_config(passkey.get_config("smoke"))


@pytest.mark.parametrize("name", ["mqar", "text"])
def test_other_task_configs_train(name, tmp_path):
  import importlib
  config = importlib.import_module(f"experiments.configs.{name}").get_config("smoke")
  result = train_and_evaluate(config, str(tmp_path))
  assert result["step"] == config.num_steps and np.isfinite(result["loss"])
  assert 0.0 <= result["token_accuracy"] <= 1.0


def test_extend_config_starts_from_a_run(finished_run, tmp_path):
  from experiments.configs import extend
  config = extend.get_config("linear,smoke")
  config.update(init_from=finished_run, eval_after_train=False, num_steps=2)
  result = train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 2 and config.task.seq_len == 2 * passkey.get_config("smoke").task.seq_len
  with open(os.path.join(str(tmp_path), "config.json")) as f:
    saved = json.load(f)
  assert saved["model"]["rope_scaling"] == "linear" and saved["init_from"] == finished_run


def test_evaluate_never_overwrites(finished_run, tmp_path):
  from experiments.evaluation import report, runs, scores
  config, model, _ = runs.load_run(finished_run)
  grid = dict(lengths=[128], depths=[0.5], examples=2, tag="x")
  report.evaluate_and_report(model, config, str(tmp_path), **grid)
  with pytest.raises(FileExistsError, match="--overwrite"):
    report.evaluate_and_report(model, config, str(tmp_path), **grid)
  own = os.path.join(finished_run, "eval_passkey.csv")
  with open(own, "rb") as f:
    trained = f.read()
  options = dict(lengths=[128], depths=[0.5], examples=2, check_rows=0)
  runs.run(finished_run, **options)  # named by what it evaluated
  named = os.path.join(finished_run, "eval_passkey_trained_128_n2.csv")
  with open(named, "rb") as f:
    first = f.read()
  with pytest.raises(FileExistsError, match="--overwrite"):
    runs.run(finished_run, **options)
  runs.run(finished_run, rope_scaling="yarn", rope_factor=2.0, **options)
  assert os.path.exists(os.path.join(finished_run, "eval_passkey_yarn2_128_n2.csv"))
  for path, content in ((own, trained), (named, first)):
    with open(path, "rb") as f:
      assert f.read() == content, path


def test_evaluate_loads_a_run_with_a_rope_override(finished_run, tmp_path):
  from experiments.evaluation import report, runs, scores
  config, model, step = runs.load_run(finished_run, "yarn", 2.0)
  assert step == 4 and model.config.rope_scaling == "yarn"
  assert model.config.rope_original_length == config.task.seq_len
  assert scores.check_generate(model, config, "passkey", config.task.seq_len, 2) == 1.0
  rows = report.evaluate_and_report(model, config, str(tmp_path), task_names=["needle"],
                                      lengths=[160, 256], depths=[0.5], examples=2, tag="yarn")
  assert [(r["length"], r["depth"]) for r in rows["needle"]] == [(160, 0.5), (256, 0.5)]
  assert (tmp_path / "eval_needle_yarn.csv").exists() and (tmp_path / "eval_needle_yarn.png").exists()
