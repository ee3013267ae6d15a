"""experiments/configs/dsa.py: the two-stage recipe end to end on `:smoke` variants."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.evaluation import train_and_evaluate
from experiments.training import checkpoints, loop, trainer
from experiments.configs import dsa as dsa_config
from models import dsa

pytestmark = pytest.mark.slow  # the module's fixture trains the three stages (~1 min)


def run(variant, workdir, **overrides):
  config = dsa_config.get_config(variant)
  config.update(overrides)
  return train_and_evaluate(config, str(workdir))


def params(model, which):
  return jax.tree_util.tree_leaves(nnx.state(model, which))


def assert_only_indexer_changed(before, after):
  for a, b in zip(params(before, dsa.MAIN_PARAMS), params(after, dsa.MAIN_PARAMS)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(params(before, dsa.INDEXER_PARAMS),
                                                      params(after, dsa.INDEXER_PARAMS)))


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
  """The three documented commands in a row (smoke sizes), trained once for the tests below:
  dense, then warm-up from the dense run, then sparse from the warm-up."""
  root = tmp_path_factory.mktemp("dsa")
  results = dict(dense=run("smoke", root / "dense"))
  results["warmup"] = run("warmup,smoke", root / "warmup", init_from=str(root / "dense"))
  results["sparse"] = run("sparse,smoke", root / "sparse", init_from=str(root / "warmup"))
  return root, results


def test_dense_stage_trains_model_and_indexer(stages):
  _, results = stages
  assert np.isfinite(results["dense"]["indexer_kl"]) and np.isfinite(results["dense"]["loss"])


def test_warmup_trains_only_the_indexer(stages):
  root, results = stages
  assert np.isfinite(results["warmup"]["indexer_kl"])
  assert np.isfinite(results["warmup"]["scored_loss"])
  config = dsa_config.get_config("warmup,smoke")
  before, after = trainer.make_model(config), trainer.make_model(config)
  checkpoints.load_params(before, str(root / "dense"))
  checkpoints.load_params(after, str(root / "warmup"))
  assert_only_indexer_changed(before, after)


def test_sparse_trains_from_the_warmup(stages):
  root, results = stages
  assert np.isfinite(results["sparse"]["indexer_kl"]) and np.isfinite(results["sparse"]["loss"])
  assert os.path.exists(root / "sparse" / "metrics.jsonl")
  config = dsa_config.get_config("sparse,smoke")
  warm, sparse = trainer.make_model(config), trainer.make_model(config)
  checkpoints.load_params(warm, str(root / "warmup"))
  checkpoints.load_params(sparse, str(root / "sparse"))
  changed = [not np.array_equal(a, b) for a, b in zip(params(warm, dsa.MAIN_PARAMS),
                                                      params(sparse, dsa.MAIN_PARAMS))]
  assert any(changed)  # stage 2 trains the model too (started from the warm-up's weights)


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
  from experiments.evaluation import report, runs, scores  # pylint: disable=g-import-not-at-top
  config = dsa_config.get_config("sparse,smoke")
  config.eval.update(length_multiples=(1,), depths=(0.5,), examples=2, batch_size=2)
  model = trainer.make_model(config)
  results = report.evaluate_and_report(model, config, str(tmp_path))
  recall = results["dsa_recall"]
  assert [r["layer"] for r in recall] == [0]  # smoke: layers (dsa, local)
  assert 0.0 < recall[0]["recall"] <= 1.0
  assert os.path.exists(tmp_path / "eval_dsa_recall.csv")
  assert "DSA indexer recall" in capsys.readouterr().out
  # The report leaves the model as it was: no recall in a normal forward.
  layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, dsa.DsaAttention)]
  assert layers and not any(m.dsa.recall for m in layers)
