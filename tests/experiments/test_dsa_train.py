"""experiments/configs/dsa.py: the two-stage recipe end to end on `:smoke` variants."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import train, trainer
from experiments.configs import dsa as dsa_config
from models import dsa


def run(variant, workdir, **overrides):
  config = dsa_config.get_config(variant)
  config.update(overrides)
  return train.train(config, str(workdir))


def params(model, which):
  return jax.tree_util.tree_leaves(nnx.state(model, which))


def test_dense_then_warmup_then_sparse(tmp_path):
  dense = run("smoke", tmp_path / "dense")
  assert np.isfinite(dense["indexer_kl"]) and np.isfinite(dense["scored_loss"])

  warm_dir = tmp_path / "warmup"
  warm = run("warmup,smoke", warm_dir, init_from=str(tmp_path / "dense"))
  assert np.isfinite(warm["indexer_kl"])
  # Warm-up changed only the indexer.
  config = dsa_config.get_config("warmup,smoke")
  before, after = trainer.make_model(config), trainer.make_model(config)
  from experiments import checkpoints  # pylint: disable=g-import-not-at-top
  checkpoints.load_params(before, str(tmp_path / "dense"))
  checkpoints.load_params(after, str(warm_dir))
  for a, b in zip(params(before, dsa.MAIN_PARAMS), params(after, dsa.MAIN_PARAMS)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(params(before, dsa.INDEXER_PARAMS),
                                                      params(after, dsa.INDEXER_PARAMS)))

  sparse = run("sparse,smoke", tmp_path / "sparse", init_from=str(warm_dir))
  assert np.isfinite(sparse["indexer_kl"]) and np.isfinite(sparse["loss"])
  assert os.path.exists(tmp_path / "sparse" / "metrics.jsonl")


def test_variants_and_stages():
  options = lambda v: dict(dsa_config.get_config(v).model.kinds.dsa.options)
  assert options("warmup")["stage"] == "dense" and options("sparse")["stage"] == "sparse"
  assert dsa_config.get_config("warmup").trainable == "indexer"
  assert dsa_config.get_config("sparse").trainable == ""
  config = dsa_config.get_config("sparse")
  assert config.task.seq_len == 8 * config.model.kinds.dsa.options.top_k
  with pytest.raises(ValueError, match="variant"):
    dsa_config.get_config("warmup,sparse")
