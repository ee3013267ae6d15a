"""Hugging Face checkpoints in runs: the model section from the checkpoint, refused conflicts,
training from it (`init_from`), evaluating it directly (`evaluate --hf`), exporting a run back.

The checkpoint is made here: a tiny random Llama written by `models.hf.save` next to a tiny BPE
(`tests/experiments/tiny_bpe.py`), so nothing needs torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import hf
from experiments.configs import hf as hf_config
from experiments.configs import passkey
from experiments.evaluation import runs, train_and_evaluate
from experiments.training import hf_bridge, loop, trainer
from tests.experiments import tiny_bpe

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("llama"))
  config = models.ModelConfig(
      vocab_size=384, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp="swiglu",
      tie_embeddings=False, layer_pattern=("global",),
      kinds={"global": models.KindSettings(rope_theta=10_000.0)})
  hf.save(models.Transformer(config, rngs=nnx.Rngs(3)), directory)
  tiny_bpe.train_bpe(directory)
  return directory


def _smoke(llama_dir, variant="smoke"):
  config = hf_config.get_config(variant)
  config.init_from = llama_dir
  return config


def test_model_section_and_tokenizer_come_from_the_checkpoint(llama_dir):
  config = hf_bridge.with_checkpoint_model(_smoke(llama_dir))
  stored = hf.read_config(llama_dir)
  assert trainer.model_config(config) == stored
  assert config.task.tokenizer == os.path.abspath(llama_dir)
  # A runtime field may change (context extension); the original length is the checkpoint's.
  yarn = hf_bridge.with_checkpoint_model(_smoke(llama_dir, "yarn,smoke"))
  assert (yarn.model.rope_scaling, yarn.model.rope_factor) == ("yarn_hf", 4.0)
  assert yarn.model.rope_original_length == 4096  # max_position_embeddings


def test_conflicting_architecture_fields_are_refused(llama_dir):
  config = passkey.get_config("smoke")  # a byte-level model's sizes
  config.init_from = llama_dir
  with pytest.raises(ValueError, match=r"model\.num_heads = 2 \(the checkpoint: 4\)"):
    hf_bridge.with_checkpoint_model(config)
  assert hf_bridge.with_checkpoint_model(hf_config.get_config("smoke")).init_from == ""


def test_config_model_section_mirrors_model_config():
  """Every ModelConfig field is a config field (so a checkpoint's model fits config.json),
  with ModelConfig's own default, and its help line."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  model = common.base_config().model.to_dict()
  fields = {f.name: f.default for f in dataclasses.fields(models.ModelConfig)}
  assert set(model) == set(fields)
  overridden = {"d_model", "num_layers", "layer_pattern", "kinds"}  # the passkey defaults
  assert {k: v for k, v in model.items() if k not in overridden and v != fields[k]} == {}
  assert all(f"model.{name}" in common.FIELD_HELP for name in fields)


@pytest.mark.slow
def test_train_from_the_checkpoint_then_export_loads_back(llama_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = _smoke(llama_dir)
  config.eval_after_train = False
  model = trainer.make_model(hf_bridge.with_checkpoint_model(config))  # random weights ...
  hf_bridge.load_weights(model, llama_dir)                               # ... replaced
  want = nnx.state(hf.load(llama_dir), nnx.Param)
  got = nnx.state(model, nnx.Param)
  assert all(np.array_equal(a, b) for a, b in zip(jax_leaves(got), jax_leaves(want)))
  first = loop.train(config, workdir, stop_at_step=1)
  assert first["step"] == 1
  result = train_and_evaluate(config, workdir)  # resumes and trains its last step
  assert result["step"] == 2 and np.isfinite(result["loss"])
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["model"]["vocab_size"] == 384 and saved["init_from"] == llama_dir
  out = str(tmp_path / "exported")
  cmd = [sys.executable, "-m", "experiments.export", f"--workdir={workdir}", f"--out={out}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False,
                        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
  run_config, trained, _ = runs.load_run(workdir)
  tokens = jnp.asarray(np.arange(24).reshape(2, 12) % 384)
  np.testing.assert_array_equal(hf.load(out)(tokens)[0], trained(tokens)[0])
  with pytest.raises(FileExistsError, match="already exists"):  # what the command reports
    hf_bridge.export(trained, run_config, out)


def test_evaluate_a_checkpoint_directly(llama_dir, tmp_path):
  rows = runs.run_hf(llama_dir, hf_config.get_config("smoke"), outdir=str(tmp_path))
  assert [r["length"] for r in rows["niah"]] == [256, 256]
  assert any(name.startswith("eval_niah") and name.endswith(".png")
             for name in os.listdir(tmp_path))
  with pytest.raises(FileExistsError):
    runs.run_hf(llama_dir, hf_config.get_config("smoke"), outdir=str(tmp_path))


def jax_leaves(state):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(state)]
