"""The gated delta rule: the chunkwise XLA form and the decoding step against the per-token scan
reference (values and gradients), the reset semantics of segment ids, input validation and the
memory the chunk form saves. The Pallas kernels: test_gated_delta_pallas.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import (GatedDeltaBlockSizes, gated_delta_reference, gated_delta_rule,
                       gated_delta_step)
from tests.helpers import assert_close, random_segments


@functools.partial(jax.jit, static_argnums=tuple(range(1, 8)))
def gdn_inputs(seed: int, batch: int, length: int, qk_heads: int, heads: int, key_dim: int,
               value_dim: int, dtype=jnp.float32):
  """Fresh random `(q, k, v, g, beta, h0)`: q, k, v standard normal; g = -softplus(x - 1) < 0
  (decays ~0.3 to 1); beta = sigmoid(x); h0 float32 normal / 3."""
  keys = jax.random.split(jax.random.key(seed), 6)
  normal = lambda i, *shape: jax.random.normal(keys[i], shape, jnp.float32)
  q = normal(0, batch, length, qk_heads, key_dim).astype(dtype)
  k = normal(1, batch, length, qk_heads, key_dim).astype(dtype)
  v = normal(2, batch, length, heads, value_dim).astype(dtype)
  g = (-jax.nn.softplus(normal(3, batch, length, heads) - 1.0)).astype(dtype)
  beta = jax.nn.sigmoid(normal(4, batch, length, heads)).astype(dtype)
  return q, k, v, g, beta, normal(5, batch, heads, key_dim, value_dim) / 3


def vjp_all(fn, args, seed: int = 7):
  """`((o, final), grads of all six inputs)` of `fn(q, k, v, g, beta, h0) -> (o, final)` against
  fixed random cotangents for both outputs."""
  out, pullback = jax.vjp(fn, *args)
  keys = jax.random.split(jax.random.key(seed), 2)
  cts = tuple(jax.random.normal(key, x.shape, jnp.float32).astype(x.dtype)
              for key, x in zip(keys, out))
  return out, pullback(cts)


def assert_matches_reference(fn, args, dtype, segment_ids=None):
  """Values (o, final state) and the gradients of all six inputs equal the reference's."""
  kw = dict(segment_ids=segment_ids, return_final_state=True)
  ref = lambda q, k, v, g, beta, h0: gated_delta_reference(q, k, v, g, beta, initial_state=h0,
                                                           **kw)
  got = lambda q, k, v, g, beta, h0: fn(q, k, v, g, beta, initial_state=h0, **kw)
  (out, grads), (ref_out, ref_grads) = (jax.jit(lambda *a, f=f: vjp_all(f, a))(*args)
                                        for f in (got, ref))
  for name, a, b in zip(("o", "final state"), out, ref_out):
    assert_close(a, b, dtype, err_msg=name)
  for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), grads, ref_grads):
    assert_close(a, b, dtype, grad=True, err_msg=name)


def repeated_keys(args):
  """A hard case for the chunk form: nearly the same key at every token, beta = 0.99, no decay
  (so `A` has entries near 1 and `(I + A)^{-1}` large ones), zero initial state."""
  q, k, v, g, beta, h0 = args
  return (q, k[:, :1] + 0.01 * k, v, jnp.zeros_like(g), jnp.full_like(beta, 0.99),
          jnp.zeros_like(h0))


# (name, dtype, length, chunk, qk_heads, heads, kind): lengths not multiples of the chunk (the bf16
# case's chunk is longer than the sequence), GQA (2 v heads per q/k head); "segments": random
# initial state and segment ids; "repeated_keys": `repeated_keys`.
CHUNK_CASES = [
    ("f32_gqa_segments_c16", jnp.float32, 45, 16, 2, 4, "segments"),
    ("f32_repeated_keys_c32", jnp.float32, 37, 32, 2, 2, "repeated_keys"),
    ("bf16_gqa_segments_c64", jnp.bfloat16, 45, 64, 2, 4, "segments"),
]


@pytest.mark.parametrize("name,dtype,length,chunk,qk_heads,heads,kind", CHUNK_CASES,
                         ids=[c[0] for c in CHUNK_CASES])
def test_chunk_form_matches_reference(name, dtype, length, chunk, qk_heads, heads, kind):
  del name
  args = gdn_inputs(0, 2, length, qk_heads, heads, 16, 8, dtype)
  segments = random_segments(1, 2, length, 3) if kind == "segments" else None
  if kind == "repeated_keys":
    args = repeated_keys(args)
  sizes = GatedDeltaBlockSizes(chunk_size=chunk)
  fn = lambda *a, **kw: gated_delta_rule(*a, implementation="xla", block_sizes=sizes, **kw)
  assert_matches_reference(fn, args, dtype, segments)


def test_step_is_the_reference_recurrence_and_prefill_continues():
  """Prefill T0 tokens (chunk form, final state), then decode token by token with
  `gated_delta_step`: the outputs and the state equal the reference over all T tokens; so does
  a chunked continuation from the prefill's state (`initial_state`)."""
  q, k, v, g, beta, h0 = gdn_inputs(2, 2, 24, 1, 2, 16, 16)
  ref_o, ref_state = jax.jit(functools.partial(gated_delta_reference, return_final_state=True))(
      q, k, v, g, beta, initial_state=h0)
  split = 17
  chunked = jax.jit(functools.partial(gated_delta_rule, return_final_state=True,
                                      block_sizes=GatedDeltaBlockSizes(chunk_size=8)))
  o, state = chunked(*(x[:, :split] for x in (q, k, v, g, beta)), initial_state=h0)
  assert_close(o, ref_o[:, :split])
  rest, _ = chunked(*(x[:, split:] for x in (q, k, v, g, beta)), initial_state=state)
  assert_close(rest, ref_o[:, split:])
  step = jax.jit(gated_delta_step)
  for t in range(split, q.shape[1]):
    o_t, state = step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
    assert_close(o_t, ref_o[:, t], err_msg=f"token {t}")
  assert_close(state, ref_state)


def test_segments_equal_separate_documents():
  """Packed documents (segment ids) = each document run on its own from a zero state; the
  initial state feeds the first document only; the final state is the last document's."""
  q, k, v, g, beta, h0 = gdn_inputs(3, 1, 20, 1, 2, 8, 8)
  ids = jnp.asarray([[4] * 6 + [0] * 6 + [4] * 8], jnp.int32)  # an id may come back: a new doc
  zero = jnp.zeros_like(h0)
  reference = jax.jit(functools.partial(gated_delta_reference, return_final_state=True))
  chunked = jax.jit(functools.partial(gated_delta_rule, return_final_state=True,
                                      block_sizes=GatedDeltaBlockSizes(8)))
  for fn in (reference, chunked):
    o, state = fn(q, k, v, g, beta, initial_state=h0, segment_ids=ids)
    for lo, hi in ((0, 6), (6, 12), (12, 20)):
      doc = [x[:, lo:hi] for x in (q, k, v, g, beta)]
      want, want_state = reference(*doc, initial_state=h0 if lo == 0 else zero)
      assert_close(o[:, lo:hi], want)
    assert_close(state, want_state)


def test_l2_normalize_off_takes_unit_vectors_as_given():
  q, k, v, g, beta, _ = gdn_inputs(4, 1, 12, 1, 1, 8, 8)
  unit = lambda x: x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-6)

  @jax.jit
  def both(q, k, v, g, beta):
    return (gated_delta_reference(q, k, v, g, beta, scale=0.5),
            gated_delta_rule(unit(q), unit(k), v, g, beta, scale=0.5, l2_normalize=False),
            gated_delta_reference(unit(q), unit(k), v, g, beta, scale=0.5, l2_normalize=False))

  want, *got = both(q, k, v, g, beta)
  for x in got:
    assert_close(x, want)


def test_public_names_and_not_a_softmax_attention():
  assert {"gated_delta_rule", "gated_delta_step", "gated_delta_reference",
          "GatedDeltaBlockSizes"} <= set(attention.__all__)
  assert not any("delta" in name for name in attention.available())
  assert attention.gated_delta.IMPLEMENTATIONS.names() == ("xla", "pallas")


def _memory(fn, args) -> tuple[int, float]:
  """Compiled temp bytes and FLOPs of `fn`'s value and gradients (the output summed)."""
  grad = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2, 3, 4))
  compiled = jax.jit(grad).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes, compiled.cost_analysis()["flops"]


def test_chunk_form_backward_memory_is_per_chunk():
  """Forward + backward temp memory at T = 512: the reference's scan stores T states
  `[dk, dv]`, the chunk form one per chunk (plus O(T C) tiles)."""
  args = gdn_inputs(5, 1, 512, 1, 1, 32, 32)[:5]
  ref, _ = _memory(gated_delta_reference, args)
  chunk, _ = _memory(gated_delta_rule, args)
  assert chunk * 3 < ref, (chunk, ref)


# --- validation: clear ValueErrors before tracing ------------------------------------------------


def test_invalid_inputs_raise():
  q, k, v, g, beta, h0 = gdn_inputs(6, 1, 8, 2, 4, 8, 8)
  cases = [
      ((q[..., :4], k, v, g, beta), {}, "same shape"),
      ((q, k, v[:, :, :3], g[:, :, :3], beta[:, :, :3]), {}, "multiple of q/k heads"),
      ((q, k, v, g[:, :, :2], beta), {}, "g, beta"),
      ((q.astype(jnp.int32), k, v, g, beta), {}, "dtype"),
      ((q, k, v, g, beta), dict(initial_state=h0[:, :2]), "state must be"),
      ((q, k, v, g, beta), dict(initial_state=h0.astype(jnp.bfloat16)), "float32"),
      ((q, k, v, g, beta), dict(segment_ids=jnp.zeros((1, 8))), "integers"),
      ((q, k, v, g, beta), dict(segment_ids=jnp.zeros((1, 7), jnp.int32)), r"\[B, T\]"),
      ((q, k, v, g, beta), dict(block_sizes=dict(chunk_size=16)), "GatedDeltaBlockSizes"),
      ((q, k, v, g, beta), dict(block_sizes=GatedDeltaBlockSizes(block_v=16)), "block_v"),
      ((q, k, v, g, beta), dict(implementation="xla", interpret=True), "interpret"),
      ((q, k, v, g, beta), dict(implementation="triton"), "implementation must be"),
  ]
  for args, kw, match in cases:
    with pytest.raises(ValueError, match=match):
      gated_delta_rule(*args, **kw)
  with pytest.raises(ValueError, match="rank"):
    gated_delta_step(q, k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0)
  with pytest.raises(ValueError, match="power of two"):
    GatedDeltaBlockSizes(chunk_size=48)


def test_step_checks_its_state():
  q, k, v, g, beta, h0 = gdn_inputs(6, 1, 1, 1, 1, 8, 8)
  with pytest.raises(ValueError, match="state must be"):
    gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0[..., :4])
  out = jax.eval_shape(gated_delta_step, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0)
  assert out[0].shape == (1, 1, 8) and out[1].dtype == np.float32
