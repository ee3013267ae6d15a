"""Decode paths: few queries (T <= 16) against a long cache, chosen by `flash_attention`.

The XLA decode path (`attention/decode_xla.py`) and the Pallas split-K kernel
(`attention/kernels/decode_pallas.py`, interpret mode + CUDA lowering) against
`reference_attention`, values and lse, on decode-shaped cases the shared grid lacks (long caches
over several chunks, windows over a full cache, ring-cache segment ids, per-row offsets, wide
groups, 16-bit caches); the grid's short cases (`len_1`, `len_7`, `decode_offset`,
`alibi_decode_all`) already run both paths through `flash_attention`, gradients included.
Also: the dispatch by T, the window's reach (memory), and DSA decode (FP8 scores in chunks,
the Pallas split-slot gather, a decode step equal to the forward's last row).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import attention
from attention import BlockSizes, Mask, flash, fp8, index_dots, sparse
from attention.common import DECODE_MAX_Q_LEN
from attention.decode_xla import SCOPE
from attention.kernels import decode_pallas, sparse_decode_pallas
from tests.attention.test_grid import lse_error, worst_error
from tests.attention.test_sparse import random_indices
from tests.attention.triton_ir import triton_kernels
from tests.helpers import assert_close, random_qkv


@dataclasses.dataclass(frozen=True)
class Decode:
  """A decode call: `T` new queries at per-row `offsets` into an `S`-key cache."""

  name: str
  q_len: int = 1
  kv_len: int = 300
  heads: int = 8
  kv_heads: int = 1
  offsets: tuple[int, ...] = (299, 150)
  window: tuple[int, int] | None = None
  causal: bool = True
  ring: bool = False  # kv segment ids of a ring cache: empty (-1) slots first, then 0
  soft_cap: float | None = None
  alibi: bool = False
  value_dim: int | None = None
  dtype: str = "f32"

  def inputs(self, head_dim: int = 16):
    dtype = {"f32": jnp.float32, "bf16": jnp.bfloat16}[self.dtype]
    b = len(self.offsets)
    q, k, v = random_qkv(7, b, self.q_len, self.kv_len, self.heads, self.kv_heads, head_dim,
                         dtype)
    if self.value_dim:
      v = jax.random.normal(jax.random.key(8), (*v.shape[:3], self.value_dim)).astype(dtype)
    seg = {}
    if self.ring:
      empty = jnp.arange(self.kv_len)[None] < jnp.array([[40], [0]])[:b]
      seg = dict(q_segment_ids=jnp.zeros((b, self.q_len), jnp.int32),
                 kv_segment_ids=jnp.where(empty, -1, 0).astype(jnp.int32))
    mask = Mask(causal=self.causal, window=self.window,
                q_offset=jnp.asarray(self.offsets, jnp.int32), **seg)
    options = dict(return_lse=True)
    if self.soft_cap:
      options["logits_soft_cap"] = self.soft_cap
    if self.alibi:
      options["alibi_slopes"] = jnp.asarray(attention.geometric_alibi_slopes(self.heads))
    return q, k, v, mask, options


CASES = [
    Decode("mqa_long"),  # 300 keys: padded to 5 chunks of 64
    Decode("gqa_window_rows", q_len=3, kv_heads=2, window=(40, 0), offsets=(100, 297)),
    Decode("mha_t16_cap_value_dim", q_len=16, kv_len=96, heads=4, kv_heads=4, offsets=(70, 10),
           soft_cap=1.5, value_dim=24),
    Decode("bidir_window_alibi", q_len=5, kv_len=200, heads=6, kv_heads=2, window=(30, 7),
           causal=False, offsets=(50, 150), alibi=True),
    Decode("ring_segments", q_len=2, kv_len=130, heads=4, kv_heads=2, window=(63, 0),
           offsets=(128, 128), ring=True),
    Decode("wide_group_per_head", q_len=8, kv_len=160, heads=16, kv_heads=2, offsets=(159, 80)),
    Decode("no_key_rows", q_len=4, kv_len=64, heads=4, kv_heads=2, offsets=(-2, 30)),
    Decode("mqa_bf16", dtype="bf16"),
    Decode("gqa_window_bf16", q_len=2, kv_heads=2, window=(40, 0), offsets=(120, 299),
           dtype="bf16"),
]
PALLAS_CASES = ("mqa_long", "gqa_window_rows", "bidir_window_alibi", "ring_segments",
                "no_key_rows", "mqa_bf16")


def _check(case: Decode, **options):
  q, k, v, mask, extra = case.inputs()
  got_out, got_lse = jax.jit(lambda q, k, v: attention.flash_attention(
      q, k, v, mask=mask, **extra, **options))(q, k, v)
  want_out, want_lse = jax.jit(lambda q, k, v: attention.reference_attention(
      q, k, v, mask=mask, **extra))(q, k, v)
  assert got_out.shape == want_out.shape and got_out.dtype == q.dtype
  assert worst_error(got_out, want_out, q.dtype, grad=False) <= 1.0
  assert lse_error(got_lse, want_lse, q.dtype) <= 1.0


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_xla_decode_matches_reference(case):
  _check(case, implementation="xla", block_sizes=BlockSizes(64, 64, 64, 64))


@pytest.mark.parametrize("case", [c for c in CASES if c.name in PALLAS_CASES],
                         ids=lambda c: c.name)
def test_pallas_decode_matches_reference(case):
  _check(case, implementation="pallas", interpret=True,
         block_sizes=BlockSizes(16, 16, 16, 16, block_q_dq=16, block_kv_dq=16))


def test_default_chunks():
  """Default chunk sizes (no BlockSizes, 1024 keys): two chunks, one of them past row 1."""
  _check(dataclasses.replace(CASES[0], kv_len=2048, offsets=(2047, 9)))


# --- which path runs --------------------------------------------------------------------------


def test_decode_path_chosen_up_to_the_threshold_only():
  resolve = flash.IMPLEMENTATIONS.resolve
  assert DECODE_MAX_Q_LEN == 16
  assert resolve("xla", False, 16) == "xla_decode" and resolve("xla", False, 17) == "xla"
  assert resolve("pallas", True, 1) == "pallas_decode" and resolve("pallas", True, 17) == "pallas"
  assert resolve("xla_decode", False, 1000) == "xla_decode"  # named: any length
  assert sparse.IMPLEMENTATIONS.resolve("pallas", False, 1) == "pallas_decode"
  assert sparse.IMPLEMENTATIONS.resolve("xla", False, 1) == "xla"
  for t, chosen in ((16, True), (17, False)):
    q, k, v = random_qkv(0, 1, t, 64, 2, 1, 16)
    mask = Mask(causal=True, q_offset=64 - t)
    text = jax.jit(lambda q, k, v: attention.flash_attention(q, k, v, mask=mask)).lower(
        q, k, v).as_text(debug_info=True)
    assert (SCOPE in text) == chosen, t


def test_window_reads_only_its_chunks():
  """A 64-key window over a 16384-key cache: the scores (and gathered keys) cover a few chunks
  (256 of 16384 keys), so the step's temporaries are > 20x smaller than without the window."""
  q, k, v = random_qkv(1, 1, 1, 16384, 8, 1, 16)

  def temp_bytes(mask):
    step = jax.jit(lambda q, k, v: attention.flash_attention(q, k, v, mask=mask))
    return step.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

  full = temp_bytes(Mask(causal=True, q_offset=16383))
  window = temp_bytes(Mask(causal=True, window=(63, 0), q_offset=16383))
  assert window * 20 < full, (window, full)


# --- CUDA lowering of the Pallas kernels -------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_pallas_decode_lowers_for_cuda(dtype):
  """Forward: one split-K kernel whose dots have >= 16 rows (the group x T padded), exact
  float32; gradients: the decode forward + the tiled dK/dV and dQ kernels."""
  q, k, v = random_qkv(2, 2, 2, 4096, 8, 2, 64, dtype)
  mask = Mask(causal=True, window=(1023, 0), q_offset=jnp.array([4094, 2000]))
  fwd = lambda q, k, v: attention.flash_attention(q, k, v, mask=mask, implementation="pallas")
  kernels = triton_kernels(fwd, q, k, v)
  assert [name.split("#")[0] for name in kernels] == ["flash_decode"]
  for precision, lhs, rhs in next(iter(kernels.values())).dots:
    assert int(lhs.split("<")[1].split("x")[0]) >= 16, lhs
    assert dtype != jnp.float32 or precision == "ieee"
  # splits: B * K * P reaches TARGET_PROGRAMS (264) unless every tile has its own program
  assert decode_pallas.num_splits(1, 1, 1000) == 264 and decode_pallas.num_splits(2, 2, 64) == 64
  if dtype == jnp.bfloat16:  # (the same kernels in float32)
    loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))
    names = triton_kernels(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    assert sorted(n.split("#")[0] for n in names) == ["flash_decode", "flash_dkdv", "flash_dq"]


# --- DSA decode ---------------------------------------------------------------------------------


def test_fp8_scores_in_chunks_equal_one_step(monkeypatch):
  """A decode step's FP8 indexer scores, converted 1024 keys per loop step, equal one step's."""
  kq, kk, kw = jax.random.split(jax.random.key(3), 3)
  q, k = jax.random.normal(kq, (2, 1, 4, 32)), jax.random.normal(kk, (2, 3072, 32))
  w = jax.random.normal(kw, (2, 1, 4))
  fmt = fp8.Fp8Format(16)  # two scale blocks per key
  keys = fp8.quantize(k, fmt)
  whole = jax.jit(lambda q, k, w: index_dots.one_query_scores(q, w, k, fmt))(q, keys, w)
  monkeypatch.setattr(index_dots, "SCORE_CHUNK", 1024)
  assert index_dots.score_chunk(3072) == 1024
  chunked = jax.jit(lambda q, k, w: index_dots.one_query_scores(q, w, k, fmt))(q, keys, w)
  assert_close(chunked, whole)


def test_dsa_decode_step_equals_forward_last_row():
  """The last token through a cache (FP8 indexer keys stored quantised, T = 1) gives the DSA
  forward's last row (top_k < length, so the selection matters)."""
  t, top_k, fmt = 32, 12, fp8.Fp8Format(16)
  q, k, v = random_qkv(4, 2, t, t, 4, 1, 16)
  kq, kk, kw = jax.random.split(jax.random.key(5), 3)
  iq, ik = jax.random.normal(kq, (2, t, 2, 16)), jax.random.normal(kk, (2, t, 16))
  iw = jax.random.normal(kw, (2, t, 2))
  dsa = lambda q, iq, ik, iw, mask: attention.dsa_attention(
      q, k, v, mask=mask, index_q=iq, index_k=ik, index_w=iw, top_k=top_k, fp8=fmt)
  full = jax.jit(dsa)(q, iq, ik, iw, Mask(causal=True))
  step = jax.jit(dsa)(q[:, -1:], iq[:, -1:], fp8.quantize(ik, fmt), iw[:, -1:],
                      Mask(causal=True, q_offset=t - 1))
  assert_close(step, full[:, -1:])


def test_sparse_decode_kernel_matches_xla():
  """T = 1 top-k gather split over the slots (13 splits of 16), one selection per kv head:
  equals the XLA path (shared selections: tests/attention/test_sparse_pallas.py, T <= 16)."""
  b, s, n, kh, top = 2, 300, 8, 2, 200
  q, k, v = random_qkv(6, b, 1, s, n, kh, 16)
  idx = random_indices(6, (b, 1, kh, top), s)
  mask = Mask(causal=True, q_offset=jnp.array([299, 120]))
  run = lambda impl, **kw: sparse.sparse_attention(q, k, v, idx, mask=mask, implementation=impl,
                                                   return_lse=True, logits_soft_cap=2.0, **kw)
  got = run("pallas", interpret=True, block_sizes=attention.SparseBlockSizes(block_k=16))
  want = run("xla")
  assert sparse_decode_pallas.num_splits(b * kh, 13) == 13
  assert_close(got[0], want[0])
  assert lse_error(got[1], want[1], jnp.float32) <= 1.0


def test_sparse_decode_kernel_lowers_for_cuda():
  q, k, v = random_qkv(7, 1, 1, 4096, 8, 1, 64, jnp.bfloat16)
  idx = random_indices(7, (1, 1, 512), 4096)
  fwd = lambda q, k, v: sparse.sparse_attention(q, k, v, idx, mask=Mask(causal=True, q_offset=4095),
                                                implementation="pallas")
  kernels = triton_kernels(fwd, q, k, v)
  assert [name.split("#")[0] for name in kernels] == ["sparse_decode"]
  assert all(int(lhs.split("<")[1].split("x")[0]) >= 16
             for _, lhs, _ in next(iter(kernels.values())).dots)
