"""The registry, and every registered attention vs the reference under its own visibility."""

from __future__ import annotations

import pytest

import attention
from attention import Mask
from tests.helpers import assert_close, random_qkv

# name -> (extra options, the equivalent mask for the reference, given the caller's causal mask)
EQUIVALENT = {
    "dense": (dict(), Mask(causal=True)),
    "flash": (dict(), Mask(causal=True)),
    "local": (dict(window=8), Mask(causal=True, window=(7, 0))),
    "ring": (dict(), Mask(causal=True)),  # no mesh here: flash on one device (see test_ring.py)
}


def test_builtin_names():
  assert {"dense", "flash", "local"} <= set(attention.available())


@pytest.mark.parametrize("name", sorted(EQUIVALENT))
def test_registered_matches_reference(name):
  options, reference_mask = EQUIVALENT[name]
  q, k, v = random_qkv(0, 1, 40, 40, 4, 2, 32)
  out = attention.get(name)(q, k, v, mask=Mask(causal=True), **options)
  assert_close(out, attention.reference_attention(q, k, v, mask=reference_mask))


def test_register_and_overwrite():
  @attention.register("test_only_dense")
  def mine(q, k, v, *, mask=None, scale=None):
    return attention.reference_attention(q, k, v, mask=mask, scale=scale)

  assert attention.get("test_only_dense") is mine
  with pytest.raises(ValueError, match="already registered"):
    attention.register("test_only_dense")(lambda *a, **k: None)
  with pytest.raises(ValueError, match="unknown attention 'nope'; available"):
    attention.get("nope")
