"""The attention contract's options beyond the shared grid: lse merging, validation, memory.

The grid (tests/attention/grid.py: the `lse_*`, `soft_cap_*`, `value_dim_*`, `alibi_*` cases)
compares every implementation with the reference, forward and gradients; here: merging two
key halves with their lse equals attention over all keys (gradients included, so they flow
through the lse), clear errors for bad options, ALiBi's memory staying O(L).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import BlockSizes, Mask
from tests.helpers import assert_close, random_qkv

SMALL = BlockSizes(block_q=16, block_kv=16, block_q_bwd=16, block_kv_bwd=32, block_q_dq=32,
                   block_kv_dq=16)


def merge(out_a, lse_a, out_b, lse_b):
  """Softmax attention over the union of two disjoint key sets from the two partial results
  `(out [B, T, N, Hv], lse [B, N, T])`; a row that sees no key in either stays 0 / -inf."""
  lse = jnp.logaddexp(lse_a, lse_b)
  safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  weight = lambda part: jnp.swapaxes(jnp.exp(part - safe), 1, 2)[..., None]  # B T N 1
  return out_a * weight(lse_a) + out_b * weight(lse_b), lse


@pytest.mark.parametrize("implementation", ["xla"])  # every backend's lse: the shared grid
def test_merging_key_halves_with_lse_equals_all_keys(implementation):
  """32 queries at positions 32..63 over 64 keys, split at key 32 (the second half's keys
  shifted by -32, so its q_offset is 0). Queries from position 53 on see no key of the first
  half (window 20): lse -inf there. ALiBi distances are shift-invariant, so they merge too."""
  q, k, v = random_qkv(11, 2, 32, 64, 4, 2, 32)
  slopes = jnp.asarray(attention.geometric_alibi_slopes(4))
  options = dict(implementation=implementation, interpret=implementation == "pallas",
                 block_sizes=SMALL if implementation == "pallas" else BlockSizes(16, 16, 16, 16),
                 alibi_slopes=slopes, logits_soft_cap=3.0, return_lse=True)

  mask = lambda offset: Mask(causal=True, window=(20, 0), q_offset=offset)
  part = lambda q, k, v, offset: attention.flash_attention(q, k, v, mask=mask(offset), **options)
  merged = lambda q, k, v: merge(*part(q, k[:, :32], v[:, :32], 32),
                                 *part(q, k[:, 32:], v[:, 32:], 0))
  full = lambda q, k, v: attention.reference_attention(
      q, k, v, mask=mask(32), alibi_slopes=slopes, logits_soft_cap=3.0, return_lse=True)
  dout = jax.random.normal(jax.random.key(1), q.shape)
  dlse = jax.random.normal(jax.random.key(2), (2, 4, 32))

  @jax.jit
  def outputs_and_grads(q, k, v):
    """Both outputs, and the gradients of a loss on out and lse (so through the lse too)."""
    first_lse = part(q, k[:, :32], v[:, :32], 32)[1]
    results = []
    for fn in (merged, full):
      (out, lse), pull = jax.vjp(fn, q, k, v)
      results.append((out, lse, pull((dout, dlse))))
    return first_lse, results

  first_lse, ((out, lse, grads), (want, want_lse, want_grads)) = outputs_and_grads(q, k, v)
  assert np.all(np.isneginf(np.asarray(first_lse[..., 21:])))  # positions >= 53: -inf
  assert_close(out, want)
  assert_close(lse, want_lse)
  for got, ref in zip(grads, want_grads):
    assert_close(got, ref, grad=True)


@pytest.mark.parametrize("options,match", [
    (dict(logits_soft_cap=0.0), "logits_soft_cap"),
    (dict(logits_soft_cap=-1.0), "logits_soft_cap"),
    (dict(logits_soft_cap=True), "logits_soft_cap"),
    (dict(alibi_slopes=jnp.ones((3,))), r"alibi_slopes must have shape \[N\] = \[4\]"),
])
def test_bad_options_raise_before_tracing(options, match):
  q, k, v = random_qkv(0, 1, 8, 8, 4, 2, 16)
  for fn in (attention.reference_attention, attention.flash_attention):
    with pytest.raises(ValueError, match=match):
      fn(q, k, v, **options)


def test_sparse_attention_refuses_alibi():
  q, k, v = random_qkv(0, 1, 8, 8, 4, 2, 16)
  indices = jnp.zeros((1, 8, 2), jnp.int32)
  with pytest.raises(ValueError, match="sparse_attention does not support alibi_slopes"):
    attention.sparse_attention(q, k, v, indices, alibi_slopes=jnp.ones((4,)))


def test_value_dim_needs_matching_batch_and_kv_heads():
  q, k, _ = random_qkv(0, 1, 8, 8, 4, 2, 16)
  with pytest.raises(ValueError, match="same shape except the head dim"):
    attention.flash_attention(q, k, jnp.ones((1, 8, 1, 24)))


def test_alibi_memory_is_linear():
  """ALiBi is computed per tile from positions: the compiled forward + backward at 4096 tokens
  needs no more temporary memory than without it (a dense bias alone would be 64 MiB)."""
  q, k, v = random_qkv(0, 1, 4096, 4096, 2, 1, 32)
  slopes = jnp.asarray(attention.geometric_alibi_slopes(2))

  def temp_bytes(**options):
    loss = lambda q, k, v: jnp.sum(attention.flash_attention(
        q, k, v, mask=Mask(causal=True), implementation="xla", **options))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  plain, alibi = temp_bytes(), temp_bytes(alibi_slopes=slopes)
  assert alibi <= 1.1 * plain + (1 << 20), (plain, alibi)
  assert alibi < 4096 * 4096 * 4 // 4, alibi


def _all_keys(q, k):
  return jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), (*q.shape[:2], k.shape[1]))


# The Pallas kernels' sink cases (out, lse, dq/dk/dv) are in the shared grid; the sink logits'
# own gradient comes from the front door's merge, the same for every backend.
SINK_IMPLEMENTATIONS = {
    "flash_xla": lambda q, k, v, mask, **o: attention.flash_attention(
        q, k, v, mask=mask, implementation="xla", block_sizes=BlockSizes(16, 16, 16, 16), **o),
    "sparse_xla": lambda q, k, v, mask, **o: attention.sparse_attention(
        q, k, v, _all_keys(q, k), mask=mask, implementation="xla", **o),
}


@pytest.mark.parametrize("name", sorted(SINK_IMPLEMENTATIONS))
def test_sink_logits_gradients_equal_the_reference(name):
  """d/d sink_logits (and d/dq, dk, dv) through out and the lse, with Mask.sinks and rows that
  see no key (their lse is the sink logit, their out 0), equal the reference's explicit column."""
  q, k, v = random_qkv(12, 1, 40, 40, 4, 2, 16)
  mask = Mask(causal=True, window=(9, 0), q_offset=-2, sinks=3)
  sinks = jnp.asarray([-2.0, 0.0, 1.0, 4.0])

  def loss(fn):
    def f(q, k, v, sinks):
      out, lse = fn(q, k, v, mask, sink_logits=sinks, return_lse=True)
      return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(lse))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(q, k, v, sinks)

  got, want = loss(SINK_IMPLEMENTATIONS[name]), loss(
      lambda q, k, v, mask, **o: attention.reference_attention(q, k, v, mask=mask, **o))
  assert_close(got[0], want[0], jnp.float32)
  assert float(jnp.max(jnp.abs(want[1][3]))) > 0.1  # the sinks do get a gradient
  for g, w in zip(got[1], want[1]):
    assert_close(g, w, jnp.float32, grad=True)


def test_sink_logits_refused_with_a_clear_error():
  q, k, v = random_qkv(13, 1, 8, 8, 4, 2, 16)
  with pytest.raises(ValueError, match=r"sink_logits must have shape \[N\] = \[4\]"):
    attention.flash_attention(q, k, v, sink_logits=jnp.zeros((2,)))
  with pytest.raises(ValueError, match="Mask.sinks must be an int >= 0"):
    Mask(sinks=-1)
