"""The registry. (Every registered name runs through the shared grid: test_grid.py.)"""

from __future__ import annotations

import pytest

import attention


def test_builtin_names():
  assert {"dense", "dsa", "flash", "local", "moba", "ring"} <= set(attention.available())


def test_register_and_overwrite():
  @attention.register("test_only_dense")
  def mine(q, k, v, *, mask=None, scale=None):
    return attention.reference_attention(q, k, v, mask=mask, scale=scale)

  assert attention.get("test_only_dense") is mine
  with pytest.raises(ValueError, match="already registered"):
    attention.register("test_only_dense")(lambda *a, **k: None)
  with pytest.raises(ValueError, match="unknown attention 'nope'; available"):
    attention.get("nope")
