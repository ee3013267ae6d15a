"""The MLM task (experiments/data/mlm.py) and `configs/mlm.py:smoke` end to end: masking
statistics, what the loss sees, needles, held-out files, train -> resume -> evaluate."""

import os

from flax import nnx
import numpy as np
import pytest

from experiments.data import mlm as mlm_task
from experiments.data import tasks
from experiments.evaluation import runs, train_and_evaluate
from experiments.training import loop, trainer
from experiments.configs import common, mlm


def test_masking_is_30_percent_then_80_10_10():
  """On 10^6 positions (20% of them padding), every share within 5 binomial sigmas."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, 1_000_000)
  valid = rng.random(tokens.shape) >= 0.2
  corrupted, selected = mask_tokens = mlm_task.mask_tokens(rng, tokens, valid, 0.3)
  selected = selected > 0
  assert not selected[~valid].any() and (corrupted[~valid] == tokens[~valid]).all()
  assert (corrupted[~selected] == tokens[~selected]).all()  # only selected positions change

  def close(count, n, p):
    assert abs(count - n * p) <= 5 * np.sqrt(n * p * (1 - p)), (count, n, p)

  close(selected.sum(), valid.sum(), 0.3)
  n, picked, original = selected.sum(), corrupted[selected], tokens[selected]
  close((picked == mlm_task.MASK_ID).sum(), n, 0.8)
  close(((picked != mlm_task.MASK_ID) & (picked != original)).sum(), n, 0.1 * 255 / 256)
  close((picked == original).sum(), n, 0.1 + 0.1 / 256)  # a random byte may be the original
  assert picked.max() <= mlm_task.MASK_ID and mask_tokens[0].dtype == np.int32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Ten small files; with heldout_every=5, files 0 and 5 are held out."""
  root = tmp_path_factory.mktemp("corpus")
  for i in range(10):
    (root / f"f{i}.py").write_bytes(f"# file {i}\n".encode() + bytes([97 + i]) * (150 + 30 * i))
  return str(root / "*.py")


def test_rows_pack_files_and_pad_the_tail(corpus):
  task = mlm_task.MLM(seq_len=128, glob=corpus, heldout_every=5, needle_rate=0.0)
  data, ids = task.stream(heldout=True)
  assert sorted(set(ids)) == [0, 5] and not set(task.stream(heldout=False)[1]) & {0, 5}
  last = task.num_rows(True) - 1
  tokens, segments = task.row(True, last)
  pad = task.seq_len * task.num_rows(True) - len(data)
  assert pad > 0 and (segments[-pad:] == -1).all() and (segments[:-pad] >= 0).all()
  tokens, segments = task.row(True, 1)  # "...file 0" then "# file 5..."
  assert set(segments) == {0, 1} and tasks.decode(tokens[segments == 1]).startswith("# file 5")


def test_batch_scores_exactly_the_masked_positions(corpus):
  task = mlm_task.MLM(seq_len=128, glob=corpus, heldout_every=5, needle_rate=1.0)
  for salt in (0, 1):
    batch = task.batch(3, 8, salt=salt)
    changed = batch["tokens"] != batch["targets"]
    assert not (changed & (batch["loss_mask"] == 0)).any()
    assert not (batch["loss_mask"][batch["segment_ids"] < 0]).any()
    np.testing.assert_array_equal(task.batch(3, 8, salt=salt)["tokens"], batch["tokens"])
  batch = task.batch(0, 8)
  for targets, segments in zip(batch["targets"], batch["segment_ids"]):
    longest = np.bincount(segments[segments >= 0]).max()
    room = longest >= 3 * task.needle_len  # a pair in every training row whose longest file
    assert tasks.decode(targets).count("needle_") == (2 if room else 0)  # has room for one
  assert "needle_" not in tasks.decode(task.batch(0, 8, salt=1)["targets"].reshape(-1))


def test_needle_lines_are_exempt_from_random_masking():
  """Several pairs per row, distinct keys; in each pair one copy's digits are always masked
  and scored, and no other byte of either line is ever corrupted or scored."""
  task = mlm_task.MLM(seq_len=256, needles_per_row=3, needle_weight=2.0)
  batch = task.batch(0, 16)
  n, pairs = task.needle_len, []
  for tokens, targets, mask in zip(batch["tokens"], batch["targets"], batch["loss_mask"]):
    text = tasks.decode(targets)
    starts = [i for i in range(len(text)) if text.startswith("\nneedle_", i)]
    keys = [text[i + 8:i + 8 + task.key_letters] for i in starts]
    assert all(keys.count(k) == 2 for k in keys)  # distinct keys, each pair complete
    lines = np.zeros(len(tokens), bool)
    for i in starts:
      lines[i:i + n] = True
    digits = lines & (mask > 0)
    assert (tokens[digits] == mlm_task.MASK_ID).all() and (mask[digits] == 2.0).all()
    rest = lines & ~digits
    assert (tokens[rest] == targets[rest]).all() and not mask[rest].any()
    assert digits.sum() == 4 * len(starts) // 2  # one copy of each pair, all 4 digits
    for key in set(keys):
      a, b = (i for i, k in zip(starts, keys) if k == key)
      assert text[a:a + n] == text[b:b + n] and digits[a:a + n].any() != digits[b:b + n].any()
    pairs.append(len(starts) // 2)
  assert max(pairs) == 3, pairs  # (a row whose longest file is short holds fewer or none)


def test_needle_batch_masks_one_value_at_the_asked_distance():
  task = mlm_task.MLM(seq_len=256, digits=4)
  batch = task.needle_batch(0, 8, seq_len=256, distance=(64, 128))
  n = task.needle_len
  for tokens, targets, mask in zip(batch["tokens"], batch["targets"], batch["loss_mask"]):
    scored = np.flatnonzero(mask)
    assert len(scored) == 4 and (tokens[scored] == mlm_task.MASK_ID).all()
    assert (tokens[mask == 0] == targets[mask == 0]).all()
    text = tasks.decode(targets)
    starts = [i for i in range(len(text)) if text.startswith("\nneedle_", i)]
    assert len(starts) == 2 and 64 <= starts[1] - starts[0] < 128
    line = text[starts[0]:starts[0] + n]
    assert text[starts[1]:starts[1] + n] == line and line[-5:-1] == tasks.decode(targets[scored])
  assert mlm_task.distance_buckets(256, n) == [(20, 32), (32, 64), (64, 128), (128, 237)]
  some = mlm_task.MLM(seq_len=256, masked_digits=2).needle_batch(0, 8, seq_len=256,
                                                                   distance=(64, 128))
  for tokens, targets, mask in zip(some["tokens"], some["targets"], some["loss_mask"]):
    text = tasks.decode(targets)
    values = [range(i + n - 5, i + n - 1) for i in range(len(text))
              if text.startswith("\nneedle_", i)]
    scored = np.flatnonzero(mask)  # 2 of one copy's 4 value digits; nothing else changed
    assert len(scored) == 2 and any(set(scored) <= set(v) for v in values)
    assert (tokens[scored] == mlm_task.MASK_ID).all() and (tokens != targets).sum() == 2
  with pytest.raises(ValueError, match="needle distances"):
    task.needle_batch(0, 1, seq_len=64, distance=(32, 128))


def test_loss_ignores_unmasked_and_padding_positions(corpus):
  config = mlm.get_config("smoke")
  config.task.update(glob=corpus, heldout_every=5)
  model = trainer.make_model(config)
  task = tasks.make_task(config.task)
  batch = task.batch(0, 2)
  batch["segment_ids"][:, -8:] = -1  # padding: never attended ...
  batch["loss_mask"][:, -8:] = 0.0   # ... or scored
  loss_fn = nnx.jit(trainer.loss_fn)  # compiled once, called three times
  loss = float(loss_fn(model, trainer.to_device(batch))[0])
  other = {k: v.copy() for k, v in batch.items()}
  free = batch["loss_mask"] == 0
  other["targets"][free] = (other["targets"][free] + 7) % 256
  other["tokens"][:, -8:] = 5  # another padding content
  assert float(loss_fn(model, trainer.to_device(other))[0]) == pytest.approx(loss, abs=1e-6)
  scored = np.argwhere(batch["loss_mask"] > 0)[0]
  other["targets"][tuple(scored)] += 1
  assert float(loss_fn(model, trainer.to_device(other))[0]) != pytest.approx(loss, abs=1e-6)


@pytest.mark.slow
def test_smoke_config_trains_resumes_and_evaluates(tmp_path):
  config = mlm.get_config("smoke")
  common.check_config(config)
  assert not config.model.causal and config.model.vocab_size > mlm_task.MASK_ID
  extend = mlm.get_config("extend,smoke")
  assert extend.task.seq_len == 4 * config.task.seq_len
  assert extend.model.kinds["global"]["rope_theta"] == 4 * config.model.kinds["global"]["rope_theta"]
  assert extend.model.kinds["local"] == config.model.kinds["local"]
  workdir = str(tmp_path / "run")
  first = train_and_evaluate(config, workdir, stop_at_step=2)  # as if killed after step 2
  assert first["step"] == 2 and "eval" not in first
  result = train_and_evaluate(config, workdir)  # the same command again: resumes
  assert [r["step"] for r in loop.read_metrics(os.path.join(workdir, "metrics.jsonl"))] == [2, 4]
  assert 0.0 <= result["token_accuracy"] <= 1.0 and np.isfinite(result["eval_loss"])
  rows = result["eval"]["mlm_needle"]
  assert [(r["distance_lo"], r["distance_hi"]) for r in rows] == [(20, 32), (32, 45)]
  assert os.path.exists(os.path.join(workdir, "eval_mlm_needle.png"))
  again = runs.run(workdir, examples=2)  # named by what it evaluated; never overwrites
  assert os.path.exists(os.path.join(workdir, "eval_mlm_needle_trained_64_n2.csv"))
  assert again["mlm_needle"][0]["length"] == 64
  with pytest.raises(FileExistsError, match="--overwrite"):
    runs.run(workdir, examples=2)
