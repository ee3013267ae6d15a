"""Pallas sparse (top-k) kernels: padded head groups vs the reference, the inverted selection,
and what the Triton IR of the CUDA lowering holds (tensor-core dots, no atomics).

Interpret mode is slow on CPU: tiny shapes (T <= 12, head_dim 16), one jit per test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import Mask, sparse
from attention.kernels import sparse_dkdv, sparse_pallas
from tests.attention.test_sparse import jit_vjp, random_indices, selected_reference
from tests.attention.triton_ir import triton_kernels
from tests.helpers import assert_close, random_qkv, vjp_of


def _pallas(indices, mask, interpret=True):
  return lambda q, k, v: sparse.sparse_attention(q, k, v, indices, mask=mask,
                                                 implementation="pallas", interpret=interpret)


@pytest.mark.parametrize("group,kv_heads,per_head,dtype", [
    (1, 2, True, jnp.float32), (4, 2, False, jnp.float32), (8, 1, False, jnp.float32),
    (16, 1, False, jnp.bfloat16), (64, 1, False, jnp.float32)],
    ids=["g1-per_head", "g4-shared", "g8-mqa", "g16-mqa-bf16", "g64-mqa"])
def test_head_groups_match_reference(group, kv_heads, per_head, dtype):
  """q tiles pad G heads to max(16, pow2(G)) rows; every group size gives the same function."""
  b, t, top = 1, 12, 5
  q, k, v = random_qkv(group, b, t, t, group * kv_heads, kv_heads, 16, dtype)
  indices = random_indices(group, (b, t, kv_heads, top) if per_head else (b, t, top), t)
  mask = Mask(causal=True)
  out, grads = jit_vjp(_pallas(indices, mask), q, k, v)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want, want_grads = vjp_of(selected_reference(*f32, indices, mask), *f32)
  assert_close(out, want, dtype, err_msg="out")
  for name, got, ref in zip("qkv", grads, want_grads):
    assert_close(got, ref, dtype, grad=True, err_msg=f"d{name}")


def test_duplicate_slots_add_like_the_xla_path():
  """A key listed twice by one query counts twice (two CSR entries), as in the XLA path."""
  q, k, v = random_qkv(3, 1, 6, 6, 4, 2, 16)
  indices = jnp.array([[[0, 0, -1], [1, 0, 1], [2, 2, 2], [3, 1, 0], [0, 4, 4], [5, 5, 1]]],
                      jnp.int32)
  mask = Mask(causal=True)
  got = jit_vjp(_pallas(indices, mask), q, k, v)
  want = jit_vjp(lambda q, k, v: sparse.sparse_attention(
      q, k, v, indices, mask=mask, implementation="xla"), q, k, v)
  assert_close(got[0], want[0])
  for g, w in zip(got[1], want[1]):
    assert_close(g, w, grad=True)


def test_inverted_selection_lists_each_key_queries():
  idx = jnp.array([[[[2, -1, 0]], [[1, 2, -1]], [[-1, -1, -1]], [[0, 2, 3]]]], jnp.int32)
  entry_t, entry_key, ptr = sparse_dkdv.inverted_selection(idx, num_key_blocks=2, block_keys=2,
                                                           block_entries=4)
  n = int(ptr[0, 0, -1])
  assert n == 7 and ptr.tolist() == [[[0, 3, 7]]]
  pairs = list(zip(np.asarray(entry_key[0, 0, :n]), np.asarray(entry_t[0, 0, :n])))
  assert pairs == [(0, 0), (0, 3), (1, 1), (2, 0), (2, 1), (2, 3), (3, 3)]  # stable, key-major
  assert np.all(np.asarray(entry_key[0, 0, n:]) == 4)  # padding never inside a block


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_triton_ir_tensor_cores_and_no_atomics(dtype):
  """Forward, dQ and dK/dV lower to `tt.dot` on the input dtype, without any atomic op;
  float32 dots are exact (`ieee`)."""
  q, k, v = random_qkv(4, 1, 32, 32, 8, 1, 64, dtype)
  indices = random_indices(4, (1, 32, 8), 32)
  fwd = _pallas(indices, Mask(causal=True), interpret=False)
  loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))
  kernels = triton_kernels(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
  names = [name.split("#")[0] for name in kernels]
  assert names == ["sparse_attention_fwd", "sparse_attention_dq", "sparse_attention_dkdv"]
  element = "f32" if dtype == jnp.float32 else "bf16"
  for name, kernel in kernels.items():
    assert not [op for op in kernel.ops if "atomic" in op], name
    assert len(kernel.dots) >= 2, name
    for precision, lhs, rhs in kernel.dots:
      assert lhs.endswith(f"x{element}>") and rhs.endswith(f"x{element}>"), (name, lhs, rhs)
      rows = int(lhs.split("<")[1].split("x")[0])
      assert rows >= sparse_pallas.MIN_DOT_ROWS, (name, lhs)
      if dtype == jnp.float32:
        assert precision == "ieee", (name, precision)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_soft_cap_and_value_dim_lower_for_cuda(dtype):
  """Soft-capping and a value head dim (48, padded to 64) != the q/k head dim (32) lower for
  CUDA in the three kernels, forward and gradients (through the lse too)."""
  q, k, _ = random_qkv(5, 1, 32, 32, 8, 1, 32, dtype)
  v = jax.random.normal(jax.random.key(6), (1, 32, 1, 48)).astype(dtype)
  indices = random_indices(5, (1, 32, 8), 32)

  def loss(q, k, v):
    out, lse = sparse.sparse_attention(q, k, v, indices, mask=Mask(causal=True),
                                       logits_soft_cap=2.0, return_lse=True,
                                       implementation="pallas")
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  kernels = triton_kernels(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
  assert len(kernels) == 3
  assert all(len(kernel.dots) >= 2 for kernel in kernels.values())


def test_padded_group_sizes():
  assert [sparse_pallas.padded_group(g) for g in (1, 4, 8, 16, 17, 64)] == [16, 16, 16, 16, 32,
                                                                            64]


def test_lowers_for_cuda_inside_shard_map_with_check_vma():
  """Inside `jax.shard_map` with its default `check_vma=True` the kernels' outputs are typed
  device-varying (`common.varying_struct`), so forward and gradients lower for CUDA."""
  q, k, v = random_qkv(6, 2, 16, 16, 2, 1, 16)
  indices = random_indices(6, (2, 16, 4), 16)
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

  def loss(q, k, v, idx):
    local = lambda q, k, v, idx: sparse.sparse_attention(
        q, k, v, idx, mask=Mask(causal=True), implementation="pallas")
    spec = jax.P("data")
    out = jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec)(q, k, v, idx)
    return jnp.sum(out)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  text = grad.trace(q, k, v, indices).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("triton") >= 3
