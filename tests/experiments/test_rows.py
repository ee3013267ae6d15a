"""Pieces of the results rows (experiments/rows): configs they build and their measurements."""

import numpy as np
import pytest

from experiments.configs import extend, passkey, text
from experiments.rows import extension
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
  assert config.num_steps <= 200  # issue 17: a short fine-tune


def test_extension_markdown_lists_rows_on_fewer_seeds_below_the_table():
  names = ["yarn, all seeds", "yarn, attempt (seed 0 only)"]
  values = [[[1.0, 0.5, 0.75], [0.2, 0.3, 0.1]], [[1.0], [0.5]]]
  text = extension.markdown(names, [1, 2], values, 256, num_seeds=3)
  table, attempts = text.split("Attempts on fewer seeds")
  assert "| yarn, all seeds | 0.75 (0.50-1.00) | 0.20 (0.10-0.30) |" in table
  assert "attempt" not in table
  assert "- yarn, attempt (seed 0 only): 1.00 / 0.50" in attempts
  assert "Attempts" not in extension.markdown(names[1:], [1, 2], values[1:], 256, num_seeds=1)
