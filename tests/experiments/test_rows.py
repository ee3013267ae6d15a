"""Pieces of the results rows (experiments/rows): configs they build and their measurements."""

import numpy as np
import pytest

from experiments.data import tasks
from experiments.configs import extend, mqar, passkey, text
from experiments.rows import base, extension, mqar as mqar_row
from experiments.rows import dsa as dsa_row
from experiments.rows import text as text_row


def test_context_lengths_restart_at_each_document():
  segments = np.array([[0, 0, 0, 1, 1], [2, 2, 2, 2, 2]])
  np.testing.assert_array_equal(text_row.context_lengths(segments),
                                [[1, 2, 3, 1, 2], [1, 2, 3, 4, 5]])


@pytest.mark.parametrize("pattern", sorted(text.PATTERNS))
def test_text_pattern_variants(pattern):
  config = text.get_config(f"{pattern},smoke")
  assert tuple(config.model.layer_pattern) == text.PATTERNS[pattern]
  assert config.task.heldout_every == 10
  with pytest.raises(ValueError, match="unknown variant"):
    text.get_config("global,local")


def _rows(segments):
  rng = np.random.default_rng(0)
  out = []
  for seg in segments:
    tokens = rng.integers(0, 256, (1, len(seg)), dtype=np.int32)
    out.append(dict(tokens=tokens, targets=np.roll(tokens, -1, axis=1),
                    loss_mask=np.ones((1, len(seg)), np.float32),
                    segment_ids=np.asarray([seg], np.int32)))
  return out


@pytest.mark.parametrize("pattern", ["local", "global"])
def test_context_ablation_pairs_the_same_bytes_and_skips_rows_of_two_files(pattern):
  from experiments.training import trainer  # pylint: disable=g-import-not-at-top
  config = text.get_config(f"{pattern},smoke")
  config.model.num_layers = 1
  config.model.kinds.local.window = 8  # one local layer sees the last 8 bytes, itself included
  model = trainer.make_model(config)
  rows = _rows([[0] * 32, [0] * 16 + [1] * 16, [3] * 32])  # the middle row holds two files
  with pytest.raises(ValueError, match="inside one file"):
    text_row.context_ablation(model, rows[1:2], cuts=(12,), scored=4)
  with pytest.raises(ValueError, match="scored=16"):
    text_row.context_ablation(model, rows, cuts=(12,), scored=16)
  out = text_row.context_ablation(model, rows, cuts=(12,), scored=4)
  assert [r["context"] for r in out] == [12, 32] and {r["tokens"] for r in out} == {2 * 4}
  # The scored bytes' 8-byte windows lie inside the last 12: a local layer loses nothing.
  if pattern == "local":
    assert out[0]["loss"] == pytest.approx(out[1]["loss"], rel=1e-5)
  else:
    assert abs(out[0]["loss"] - out[1]["loss"]) > 1e-4


def test_text_dsa_variant_is_alternating_with_dsa_global_layers():
  config = text.get_config("dsa")
  assert tuple(config.model.layer_pattern) == ("dsa", "local", "local")
  assert config.model.kinds.dsa.options.top_k == config.task.seq_len // 8
  assert config.model.kinds.dsa.rope_theta == config.model.kinds["global"].rope_theta
  assert config.model.kinds.dsa.options.stage == "dense" and config.aux_losses.indexer_kl > 0
  assert text.get_config("dsa,smoke").model.kinds.dsa.options.index_dim == 8


def test_text_row_dsa_chain_has_the_other_models_total_steps():
  sizes = text_row.FULL
  dense = text_row.config_for(sizes, "alternating", 1, "/rows")
  sparse = text_row.config_for(sizes, "dsa", 1, "/rows")
  others = [text_row.config_for(sizes, p, 1, "/rows") for p in ("global", "local")]
  assert [c.num_steps for c in others] == [dense.num_steps, dense.num_steps] == [sizes.steps] * 2
  assert sparse.init_step + sparse.num_steps == sizes.steps
  assert sparse.init_from == "/rows/alternating_s1"
  assert sparse.init_step % dense.checkpoint_every == 0  # the warm-up's end is checkpointed
  assert (dense.model.kinds.dsa.options.stage, sparse.model.kinds.dsa.options.stage) == (
      "dense", "sparse")
  assert sparse.model.kinds.dsa.options.top_k == sizes.seq_len // 8 == 128
  assert {c.task.seq_len for c in others + [dense, sparse]} == {sizes.seq_len}
  assert {c.model.d_model for c in others + [dense, sparse]} == {sizes.d_model}


def test_passkey_rope_variant_is_ordinary_rope_everywhere():
  config = passkey.get_config("rope,smoke")
  assert tuple(config.model.layer_pattern) == ("global",)
  assert config.model.kinds["global"].rope_theta == 1e4
  full = passkey.get_config("rope")
  assert full.model.d_model // full.model.num_heads == 32  # head_dim: 16 frequency pairs
  assert (full.task.min_len, full.task.stretch) == (104, False)  # filler 0 to L - 104


def test_extend_sets_length_and_rope():
  config = extend.extend(passkey.get_config("rope"), "yarn", multiple=4, factor=16)
  assert config.task.seq_len == 1024
  assert (config.model.rope_scaling, config.model.rope_factor,
          config.model.rope_original_length) == ("yarn", 16.0, 256)
  assert extend.extend(passkey.get_config(), "none", multiple=2,
                       factor=2).model.rope_scaling == "none"
  with pytest.raises(ValueError, match="unknown extension method"):
    extend.extend(passkey.get_config(), "pi", multiple=2, factor=2)


def test_extension_finetune_config_starts_from_the_source():
  sizes = extension.FULL
  config = extension.finetune_config(sizes, sizes.finetunes[0], "ntk", 1, "/src")
  assert config.init_from == "/src" and config.seed == 1
  assert config.task.seq_len == sizes.finetunes[0].multiple * sizes.seq_len
  assert (config.task.min_len, config.task.stretch) == (104, False)  # every document length
  yarn = extension.finetune_config(sizes, sizes.finetunes[0], "yarn", 1, "/src")
  assert (yarn.model.rope_yarn_alpha, yarn.model.rope_yarn_beta) == sizes.yarn_ramp
  assert config.num_steps <= 200  # a short fine-tune, as the row states


def test_extension_markdown_lists_rows_on_fewer_seeds_below_the_table():
  names = ["yarn, all seeds", "yarn, attempt (seed 0 only)"]
  values = [[[1.0, 0.5, 0.75], [0.2, 0.3, 0.1]], [[1.0], [0.5]]]
  text = extension.markdown(names, [1, 2], values, 256, num_seeds=3)
  table, attempts = text.split("Attempts on fewer seeds")
  assert "| yarn, all seeds | 0.75 (0.50-1.00) | 0.20 (0.10-0.30) |" in table
  assert "attempt" not in table
  assert "- yarn, attempt (seed 0 only): 1.00 / 0.50" in attempts
  assert "Attempts" not in extension.markdown(names[1:], [1, 2], values[1:], 256, num_seeds=1)


def test_extension_whole_row_finetune_spreads_needles_over_the_row():
  half = extension.Finetune(multiple=4, factor=16, steps=2, batch_size=8, whole_rows=0.5)
  assert extension.finetune_config(extension.FULL, half, "yarn", 0, "/src").task.whole_rows == 0.5
  assert half.name.endswith("_whole0.5") and "50% of rows" in half.label
  ft = extension.Finetune(multiple=4, factor=16, steps=2, batch_size=8, whole_rows=1)
  config = extension.finetune_config(extension.FULL, ft, "yarn", 0, "/src")
  assert ft.name.endswith("_whole") and config.task.min_len == 0
  batch = tasks.make_task(config.task, seed=0).batch(0, 8)
  assert (batch["segment_ids"] == 0).all()  # one document filling each row
  assert (batch["loss_mask"].sum(axis=1) == 6).all()  # one answer (" " + 5 digits) per row
  needle = tasks.encode("The pass key is")
  starts = [next(i for i in range(len(row)) if (row[i:i + len(needle)] == needle).all())
            for row in batch["tokens"]]
  assert max(starts) - min(starts) > 1024 / 4  # depths spread over the row


def test_mqar_dsa_variant_is_alternating_with_a_dsa_layer():
  config = mqar.get_config("dsa")
  assert tuple(config.model.layer_pattern) == ("local", "dsa")
  assert config.model.kinds.dsa.options.top_k == config.task.seq_len // 8
  assert config.model.kinds.dsa.options.stage == "dense" and config.aux_losses.indexer_kl > 0
  smoke = mqar.get_config("dsa,smoke")
  assert smoke.model.num_layers == 2 and smoke.model.kinds.dsa.options.index_dim == 8


def test_mqar_row_dsa_chain_has_the_dense_models_total_steps():
  ctx = base.Context(workdir="/rows", quick=False, seeds=(0, 1, 2))
  dense = mqar_row.make_config(ctx, "dsa_dense", 1)
  sparse = mqar_row.make_config(ctx, "dsa", 1)
  assert dense.num_steps == sparse.init_step + sparse.num_steps == mqar_row.STEPS
  assert (dense.model.kinds.dsa.options.stage, sparse.model.kinds.dsa.options.stage) == (
      "dense", "sparse")
  assert sparse.init_from == "/rows/dsa_dense_s1" and sparse.optim.lr < dense.optim.lr
  assert sparse.init_step % dense.checkpoint_every == 0  # the warm-up's end is checkpointed
  assert mqar_row.make_config(ctx, "alternating", 1).num_steps == mqar_row.STEPS
  with pytest.raises(ValueError, match="sparse_steps"):
    dsa_row.chain_stage(mqar.get_config("dsa"), True, "/rows/d", 100, 100)


def test_sparse_row_models_select_the_same_number_of_keys():
  """Row 10: DSA's top_k, MoBA's (gated + own) blocks and NSA's top_n blocks hold L/8 keys."""
  from experiments.configs import sparse  # pylint: disable=g-import-not-at-top
  for setting in sparse.SETTINGS:
    config = sparse.get_config(setting)
    kinds = config.model.kinds
    assert config.task.seq_len == sparse.LENGTH == 128
    assert kinds.dsa.options.top_k == 16
    moba = kinds.moba.options
    assert (moba.top_k_blocks + 1) * moba.block_size == 16
    assert kinds.nsa.options.top_n * kinds.nsa.options.select_block == 16
    assert config.model.layer_pattern[1] == ("dsa" if setting in ("dense", "dsa") else setting)
  assert sparse.get_config("dsa").model.kinds.dsa.options.stage == "sparse"
  with pytest.raises(ValueError, match="unknown task"):
    sparse.set_task(sparse.get_config(), "nope")
