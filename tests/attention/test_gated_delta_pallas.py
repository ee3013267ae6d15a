"""The gated delta rule's Pallas kernels: interpret mode against the per-token reference (values
and gradients), the CUDA lowering (no GPU needed), the Triton IR's dot precision, and block
sizes rejected before tracing."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from attention import GatedDeltaBlockSizes, gated_delta_rule
from tests.attention.test_gated_delta import assert_matches_reference, gdn_inputs
from tests.attention.triton_ir import triton_kernels
from tests.helpers import assert_close, random_segments

# 16-token chunks and 16-column v blocks: T = 40 spans 3 chunks (the last one padded), dv = 32
# two v blocks, 4 v heads on 2 q/k heads.
SMALL = GatedDeltaBlockSizes(chunk_size=16, block_v=16)
SHAPE = (2, 40, 2, 4, 16, 32)  # B, T, K, H, dk, dv


def _pallas(block_sizes=SMALL, interpret=True):
  return functools.partial(gated_delta_rule, implementation="pallas", block_sizes=block_sizes,
                           interpret=interpret)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_interpret_matches_reference(dtype):
  """GQA, an initial state, segment resets and a padded last chunk, two v blocks."""
  args = gdn_inputs(10, *SHAPE, dtype)
  segments = random_segments(11, SHAPE[0], SHAPE[1], 3)
  assert_matches_reference(_pallas(), args, dtype, segments)


def test_default_dispatch_with_interpret():
  """`implementation=None, interpret=True` runs the kernels (default sizes: one 64-token chunk,
  dv 16 -> one v block)."""
  q, k, v, g, beta, _ = gdn_inputs(12, 1, 20, 1, 1, 16, 16)
  got = jax.jit(functools.partial(gated_delta_rule, interpret=True))(q, k, v, g, beta)
  want = jax.jit(functools.partial(gated_delta_rule, implementation="xla"))(q, k, v, g, beta)
  assert_close(got, want)


# --- CUDA lowering (no GPU needed) ----------------------------------------------------------------


def _loss(fn, segments):
  def loss(q, k, v, g, beta, h0):
    o, final = fn(q, k, v, g, beta, initial_state=h0, segment_ids=segments,
                  return_final_state=True)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)
  return loss


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_lowers_for_cuda_and_dots_are_exact_float32(dtype):
  """Forward and backward lower to one Triton kernel each; every dot is float32 x float32 with
  `ieee` input precision (exact), with and without segment ids."""
  args = gdn_inputs(13, *SHAPE, dtype)
  for segments in (None, random_segments(14, SHAPE[0], SHAPE[1], 3)):
    grad = jax.grad(_loss(_pallas(interpret=False), segments), argnums=tuple(range(6)))
    kernels = triton_kernels(grad, *args)
    assert [name.split("#")[0] for name in kernels] == ["gated_delta_fwd", "gated_delta_bwd"]
    for name, kernel in kernels.items():
      assert len(kernel.dots) >= 8, name
      for precision, lhs, rhs in kernel.dots:
        assert precision == "ieee" and lhs.endswith("xf32>") and rhs.endswith("xf32>"), name
      assert "tt.atomic_rmw" not in kernel.ops, name


@pytest.mark.parametrize("key_dim,value_dim", [(64, 64), (128, 128), (256, 128)])
def test_default_sizes_lower_for_cuda(key_dim, value_dim):
  """Production shapes with the default sizes (chunk 64, block_v 64): lowering only."""
  b, t, qk_heads, heads = 1, 4096, 2, 4
  shapes = [(b, t, qk_heads, key_dim)] * 2 + [(b, t, heads, value_dim), (b, t, heads),
                                              (b, t, heads)]
  args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in shapes]
  args.append(jax.ShapeDtypeStruct((b, heads, key_dim, value_dim), jnp.float32))
  grad = jax.grad(_loss(_pallas(None, interpret=False), None), argnums=tuple(range(6)))
  text = jax.jit(grad).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") + text.count("@triton_kernel_call_ffi") == 2


# --- block sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes,dims,match", [
    (dict(chunk_size=8), (64, 64), "16, 32 or 64"),
    (dict(chunk_size=128), (64, 64), "16, 32 or 64"),
    (dict(block_v=8), (64, 64), "block_v"),
    (dict(block_v=128), (64, 64), "block_v"),
    (dict(block_v=256), (256, 256), "block_v"),
    (dict(), (512, 64), "head dims up to 256"),
])
def test_invalid_block_sizes_raise_before_lowering(sizes, dims, match):
  key_dim, value_dim = dims
  args = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in (
      (1, 64, 1, key_dim), (1, 64, 1, key_dim), (1, 64, 1, value_dim), (1, 64, 1), (1, 64, 1))]
  with pytest.raises(ValueError, match=match):
    jax.jit(_pallas(GatedDeltaBlockSizes(**sizes), interpret=False)).trace(*args)
