"""experiments/configs/dsa.py: the two-stage recipe end to end on `:smoke` variants."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import checkpoints, train, trainer
from experiments.configs import dsa as dsa_config
from models import dsa


def run(variant, workdir, **overrides):
  config = dsa_config.get_config(variant)
  config.update(overrides)
  return train.train(config, str(workdir))


def params(model, which):
  return jax.tree_util.tree_leaves(nnx.state(model, which))


def assert_only_indexer_changed(before, after):
  for a, b in zip(params(before, dsa.MAIN_PARAMS), params(after, dsa.MAIN_PARAMS)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(params(before, dsa.INDEXER_PARAMS),
                                                      params(after, dsa.INDEXER_PARAMS)))


def test_warmup_trains_only_the_indexer_then_sparse(tmp_path):
  """Warm-up (from the seed's initial weights) then sparse training from its checkpoint."""
  warm_dir = tmp_path / "warmup"
  warm = run("warmup,smoke", warm_dir)
  assert np.isfinite(warm["indexer_kl"]) and np.isfinite(warm["scored_loss"])
  config = dsa_config.get_config("warmup,smoke")
  initial, trained = trainer.make_model(config), trainer.make_model(config)
  checkpoints.load_params(trained, str(warm_dir))
  assert_only_indexer_changed(initial, trained)

  sparse = run("sparse,smoke", tmp_path / "sparse", init_from=str(warm_dir))
  assert np.isfinite(sparse["indexer_kl"]) and np.isfinite(sparse["loss"])
  assert os.path.exists(tmp_path / "sparse" / "metrics.jsonl")


@pytest.mark.slow
def test_dense_then_warmup_then_sparse_commands(tmp_path):
  """The three documented commands in a row (smoke sizes)."""
  dense = run("smoke", tmp_path / "dense")
  assert np.isfinite(dense["indexer_kl"])
  run("warmup,smoke", tmp_path / "warmup", init_from=str(tmp_path / "dense"))
  config = dsa_config.get_config("warmup,smoke")
  before, after = trainer.make_model(config), trainer.make_model(config)
  checkpoints.load_params(before, str(tmp_path / "dense"))
  checkpoints.load_params(after, str(tmp_path / "warmup"))
  assert_only_indexer_changed(before, after)
  sparse = run("sparse,smoke", tmp_path / "sparse", init_from=str(tmp_path / "warmup"))
  assert np.isfinite(sparse["loss"])


def test_variants_and_stages():
  options = lambda v: dict(dsa_config.get_config(v).model.kinds.dsa.options)
  assert options("warmup")["stage"] == "dense" and options("sparse")["stage"] == "sparse"
  assert dsa_config.get_config("warmup").trainable == "indexer"
  assert dsa_config.get_config("sparse").trainable == ""
  config = dsa_config.get_config("sparse")
  assert config.task.seq_len == 8 * config.model.kinds.dsa.options.top_k
  with pytest.raises(ValueError, match="variant"):
    dsa_config.get_config("warmup,sparse")


def test_evaluate_reports_indexer_recall(tmp_path, capsys):
  """evaluate_and_report adds the per-layer DSA recall (a CSV and a printed line)."""
  from experiments import evaluate  # pylint: disable=g-import-not-at-top
  config = dsa_config.get_config("sparse,smoke")
  config.eval.update(length_multiples=(1,), depths=(0.5,), examples=2, batch_size=2)
  model = trainer.make_model(config)
  results = evaluate.evaluate_and_report(model, config, str(tmp_path))
  recall = results["dsa_recall"]
  assert [r["layer"] for r in recall] == [0]  # smoke: layers (dsa, local)
  assert 0.0 < recall[0]["recall"] <= 1.0
  assert os.path.exists(tmp_path / "eval_dsa_recall.csv")
  assert "DSA indexer recall" in capsys.readouterr().out
  # The report leaves the model as it was: no recall in a normal forward.
  layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, dsa.DsaAttention)]
  assert layers and not any(m.dsa.recall for m in layers)
