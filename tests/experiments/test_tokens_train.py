"""Training on a token file (tiny BPE, `tokens.py:smoke`): exact resume, TensorBoard scalars,
the `niah` grid (files, shapes; a perfect copier scores 1.0 for decoders and encoders)."""

import csv
import os
import re
import struct

import numpy as np
import pytest

from experiments.configs import tokens as tokens_config
from experiments.data import tokenize_corpus
from experiments.evaluation import needle, report, train_and_evaluate
from experiments.training import loop, trainer
from tests.experiments import tiny_bpe


@pytest.fixture(scope="module")
def token_corpus(bpe_dir, tmp_path_factory):
  """A token file of the tiny BPE's training texts cut into 16 documents."""
  directory = tmp_path_factory.mktemp("corpus")
  text = "".join(tiny_bpe.stdlib_texts())[:60000]
  for i in range(16):
    (directory / f"{i:02d}.txt").write_text(text[i * 3750:(i + 1) * 3750])
  out = str(directory / "tokens")
  tokenize_corpus.tokenize(str(directory / "*.txt"), bpe_dir, out, progress=False)
  return out


def smoke(token_corpus, bpe_dir, **overrides):
  config = tokens_config.get_config("smoke")
  config.task.update(path=token_corpus, tokenizer=bpe_dir)
  config.model.vocab_size = 384
  config.log_every = 1
  config.update(overrides)
  return config


def read_scalars(workdir):
  """{tag: {step: value}} of every TensorBoard event file in `workdir` (TFRecord framing:
  length, its CRC, the Event proto, its CRC)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = {}
  for name in sorted(os.listdir(workdir)):
    if name.startswith("events.out.tfevents"):
      with open(os.path.join(workdir, name), "rb") as f:
        data = f.read()
      pos = 0
      while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
          out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


@pytest.fixture(scope="module")
def straight_run(token_corpus, bpe_dir, tmp_path_factory):
  """4 steps on the token file, then the niah grid (real generation with the KV cache)."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  result = train_and_evaluate(smoke(token_corpus, bpe_dir), workdir)
  return workdir, result


def test_run_writes_tensorboard_scalars_and_the_niah_grid(straight_run):
  workdir, result = straight_run
  metrics = loop.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  scalars = read_scalars(workdir)
  assert sorted(scalars["loss"]) == [1, 2, 3, 4]
  np.testing.assert_allclose([scalars["loss"][r["step"]] for r in metrics],
                             [r["loss"] for r in metrics], rtol=1e-6)
  assert {"lr", "grad_norm", "tokens_per_s", "eval_loss"} <= set(scalars)
  with open(os.path.join(workdir, "eval_niah.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["length"], r["depth"]) for r in rows] == [("256", "0.0"), ("256", "1.0")]
  assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
  assert os.path.getsize(os.path.join(workdir, "eval_niah.png")) > 0
  assert result["eval"]["niah"] == [dict(r, length=int(r["length"]), depth=float(r["depth"]),
                                         examples=int(r["examples"]),
                                         accuracy=float(r["accuracy"]),
                                         token_accuracy=float(r["token_accuracy"]))
                                    for r in rows]


def test_resume_on_the_token_corpus_is_exact(straight_run, token_corpus, bpe_dir, tmp_path):
  straight, _ = straight_run
  resumed = str(tmp_path / "resumed")
  config = smoke(token_corpus, bpe_dir, eval_after_train=False)
  assert train_and_evaluate(config, resumed, stop_at_step=2)["step"] == 2  # "killed" here
  assert train_and_evaluate(config, resumed)["step"] == 4  # the same command again
  got, want = (loop.read_metrics(os.path.join(w, "metrics.jsonl")) for w in (resumed, straight))
  assert [r["step"] for r in got] == [1, 2, 3, 4]
  np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=0,
                             atol=1e-5)
  assert sorted(read_scalars(resumed)["loss"]) == [1, 2, 3, 4]


def copier(model, rows, answer_len, tok):
  """A perfect model: reads the needle's value in the row (its answer hidden) and says it."""
  del model
  out = []
  for row in rows:
    text = tok.decode(row[:-answer_len])
    value = re.search(r"The special magic number for \w+ is (\d+)\.", text).group(1)
    out.append(tok.encode(" " + value, continuation=True))
  return np.stack(out)


@pytest.mark.parametrize("causal", [True, False])
def test_niah_scores_a_perfect_copier_one(token_corpus, bpe_dir, tmp_path, monkeypatch, causal):
  config = smoke(token_corpus, bpe_dir)
  config.model.causal = causal
  model = trainer.make_model(config)
  if not causal:  # the real fill-in: the answer masked, shapes right, a random model's score
    rows = needle.niah_grid(model, config, "niah", [256], [0.5], 2, 2)
    assert len(rows) == 1 and 0.0 <= rows[0]["accuracy"] <= 1.0
  monkeypatch.setattr(needle, "generate_answers" if causal else "fill_answers", copier)
  results = report.evaluate_and_report(model, config, str(tmp_path), task_names=["niah"],
                                       lengths=[200, 256], depths=[0.0, 0.5, 1.0])
  assert [r["accuracy"] for r in results["niah"]] == [1.0] * 6
  assert [r["token_accuracy"] for r in results["niah"]] == [1.0] * 6
  assert os.path.exists(tmp_path / "eval_niah.csv") and os.path.exists(tmp_path / "eval_niah.png")


def test_a_model_vocabulary_smaller_than_the_tokenizer_is_refused(token_corpus, bpe_dir,
                                                                   tmp_path):
  config = smoke(token_corpus, bpe_dir)
  config.model.vocab_size = 256
  with pytest.raises(ValueError, match="vocab_size=384"):
    train_and_evaluate(config, str(tmp_path))
  with pytest.raises(ValueError, match="unknown evaluation task"):
    report.evaluate_and_report(None, config, str(tmp_path), task_names=["nope"])
