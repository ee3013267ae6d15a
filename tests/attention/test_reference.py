"""reference_attention vs jax.nn.dot_product_attention, and input validation of every variant."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import attention
from attention import BlockSizes, Mask
from tests.helpers import assert_close, random_qkv, random_segments


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_reference_matches_jax_dot_product_attention(causal, heads):
  n, kh = heads
  q, k, v = random_qkv(0, 2, 33, 33, n, kh, 32)
  expected = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
  assert_close(attention.reference_attention(q, k, v, mask=Mask(causal=causal)), expected)


def test_reference_window_matches_jax_local_window():
  q, k, v = random_qkv(1, 1, 50, 50, 2, 2, 32)
  expected = jax.nn.dot_product_attention(q, k, v, local_window_size=(5, 3),
                                          implementation="xla")
  assert_close(attention.reference_attention(q, k, v, mask=Mask(window=(5, 3))), expected)


def test_reference_segments_equal_separate_documents():
  q, k, v = random_qkv(2, 1, 40, 40, 2, 1, 32)
  seg = jnp.asarray([[0] * 15 + [1] * 25], jnp.int32)
  out = attention.reference_attention(q, k, v, mask=Mask(causal=True, q_segment_ids=seg,
                                                         kv_segment_ids=seg))
  first = attention.reference_attention(q[:, :15], k[:, :15], v[:, :15], mask=Mask(causal=True))
  second = attention.reference_attention(q[:, 15:], k[:, 15:], v[:, 15:], mask=Mask(causal=True))
  assert_close(out, jnp.concatenate([first, second], axis=1))


def test_q_offset_equals_slice_of_full_causal():
  q, k, v = random_qkv(3, 1, 30, 30, 2, 1, 32)
  full = attention.reference_attention(q, k, v, mask=Mask(causal=True))
  tail = attention.reference_attention(q[:, 20:], k, v, mask=Mask(causal=True, q_offset=20))
  assert_close(tail, full[:, 20:])


def _bad_inputs():
  q, k, v = random_qkv(4, 2, 16, 16, 4, 2, 32)
  seg = random_segments(0, 2, 16)
  return [
      ("rank", (q[0], k, v), {}, "rank 4"),
      ("batch", (q, k[:1], v[:1]), {}, "same batch size"),
      ("head_dim", (q, k[..., :16], v[..., :16]), {}, "same head_dim"),
      ("kv shape", (q, k, v[:, :8]), {}, "same shape"),
      ("heads", (q[:, :, :3], k, v), {}, "multiple of kv heads"),
      ("segments shape", (q, k, v), dict(mask=Mask(q_segment_ids=seg[:, :8],
                                                   kv_segment_ids=seg)), "q_segment_ids"),
      ("offset shape", (q, k, v), dict(mask=Mask(q_offset=jnp.zeros((3,), jnp.int32))),
       "q_offset"),
      ("mask type", (q, k, v), dict(mask="causal"), "attention.Mask"),
      ("int q", (q.astype(jnp.int32), k, v), {}, "q must have a floating dtype.*int32"),
      ("int kv", (q, k.astype(jnp.int32), v.astype(jnp.int32)), {}, "k must have a floating"),
      ("empty q", (q[:, :0], k, v), {}, "T >= 1.*T = 0"),
      ("empty kv", (q, k[:, :0], v[:, :0]), {}, "S >= 1.*S = 0"),
      ("float offset array", (q, k, v), lambda: dict(mask=Mask(q_offset=jnp.ones((2,)))),
       "q_offset must be a Python int or an int array"),
  ]


@pytest.mark.parametrize("fn_name", ["dense", "flash", "local"])
@pytest.mark.parametrize("case", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_raises_value_error(fn_name, case):
  _, args, kwargs, message = case
  options = dict(window=4) if fn_name == "local" else {}
  with pytest.raises(ValueError, match=message):
    kwargs = kwargs() if callable(kwargs) else kwargs  # a bad Mask raises when built
    attention.get(fn_name)(*args, **kwargs, **options)


def test_bad_mask_and_block_sizes():
  with pytest.raises(ValueError, match="window sides must be >= 0"):
    Mask(window=(-1, 0))
  with pytest.raises(ValueError, match="pair of ints"):
    Mask(window=(1, 2, 3))
  with pytest.raises(ValueError, match="both q_segment_ids and kv_segment_ids"):
    Mask(q_segment_ids=jnp.zeros((1, 4), jnp.int32))
  for bad in (1.5, jnp.float32(1.0), jnp.array([1.5, 2.0])):
    with pytest.raises(ValueError, match=r"q_offset must be a Python int or an int array.*1\."):
      Mask(causal=True, q_offset=bad)
  Mask(causal=True, q_offset=jnp.array([1, 2]))  # int arrays (and Python ints) are fine
  for bad in (dict(block_q=100), dict(block_kv=0), dict(block_q_bwd=-64), dict(num_warps=3)):
    with pytest.raises(ValueError, match="BlockSizes"):
      BlockSizes(**bad)
  q, k, v = random_qkv(5, 1, 8, 8, 2, 2, 32)
  with pytest.raises(ValueError, match="implementation must be one of"):
    attention.flash_attention(q, k, v, implementation="cuda")
  with pytest.raises(ValueError, match="local window must be >= 1"):
    attention.local_attention(q, k, v, window=0)
  with pytest.raises(ValueError, match="local attention needs a window"):
    attention.local_attention(q, k, v, mask=Mask(causal=True))
