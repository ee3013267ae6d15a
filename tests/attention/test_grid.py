"""Every attention implementation over the shared grid (tests/attention/grid.py), as one test.

An implementation is one `Impl` entry: a function `(q, k, v, mask) -> out` and the cases it
supports. Each (implementation, case, dtype) is one jitted computation of the output and the
three gradients of the implementation and of `reference_attention`, compared with the DESIGN.md
tolerances (`tests.helpers.tolerance`). Entries:

* flash, XLA path (small tiles: several tiles per case; default tiles on the long cases);
* flash, Pallas kernels in interpret mode (the short cases);
* sparse attention (XLA and Pallas-interpret) with every key selected (top_k >= L): it must
  equal dense attention under the same mask;
* block-sparse attention (XLA and Pallas-interpret) with every key block selected: the same;
* ring attention on 8 host devices (one subprocess for all its cases, tests/multidevice.py);
* every name in the registry (`attention.available()`), with the options it needs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import BlockSizes, BlockSparseBlockSizes, SparseBlockSizes
from tests.attention.grid import BY_NAME, CASES, DTYPES, FEATURES, Case, case_dtypes
from tests.helpers import tolerance
from tests.multidevice import run_worker

XLA_TILES = BlockSizes(64, 64, 64, 64)
PALLAS_TILES = BlockSizes(block_q=16, block_kv=16, block_q_bwd=16, block_kv_bwd=32,
                          block_q_dq=32, block_kv_dq=16)
# Registered names: the grid cases they run (float32) and the options they need.
REGISTRY_CASES = ("segments_window", "chunk_offsets")
SPARSE_CASES = ("full", "causal", "window_3_0", "segments_causal", "gqa_8_2", "mqa", "len_7",
                "chunk_offsets", "no_key_rows", "cross_attn", "lse_no_key_rows",
                "soft_cap_segments", "value_dim_offsets", "sinks_window")
SPARSE_FEATURES = frozenset({"soft_cap", "value_dim", "lse", "sinks",
                             "sink_logits"})  # ALiBi: refused
# Block-sparse: the blocks are the selection, so Mask.sinks is refused.
BLOCK_SPARSE_FEATURES = SPARSE_FEATURES - {"sinks"}
# Block-sparse, every block selected (tests/attention/test_block_sparse.py has sparse selections).
BLOCK_SPARSE_CASES = ("segments_window", "value_dim_offsets")
BLOCK_SPARSE_PALLAS_CASES = ("lse_no_key_rows", "soft_cap_segments")
# Ring: "causal" (GQA 4/2; the zig-zag default), windows + segments (contiguous, both sweeps),
# an odd per-device length; tests/attention/test_ring.py has the rest (layouts, halos, offsets, bf16).
RING_CASES = ("causal", "segments_window", "len_100")


@dataclasses.dataclass(frozen=True)
class Impl:
  name: str
  fn: Callable  # (q, k, v, mask, **case.options()) -> out, or (out, lse) with return_lse
  supports: Callable[[Case], bool]
  low_precision: bool = True
  features: frozenset = FEATURES  # contract options it computes (the others it refuses)


def all_keys(q, k):
  """Indices `[B, T, S]` selecting every key (top_k >= L): sparse attention == dense."""
  return jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), (*q.shape[:2], k.shape[1]))


def _dsa_options(q, k):
  """Random indexer inputs with top_k = S: every visible key is selected."""
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  kq, kk, kw = jax.random.split(jax.random.key(7), 3)
  return dict(index_q=jax.random.normal(kq, (b, t, 2, 8)),
              index_k=jax.random.normal(kk, (b, s, 8)),
              index_w=jax.random.normal(kw, (b, t, 2)), top_k=s)


def _moba_options(q, k):
  """Blocks of 8 keys, top_k_blocks covering every block: MoBA == dense causal attention."""
  del q
  return dict(block_size=8, top_k_blocks=-(-k.shape[1] // 8))


REGISTRY_OPTIONS = {"dsa": _dsa_options, "moba": _moba_options}
# Names that run other grid cases than REGISTRY_CASES (dsa: indexer + top-k; moba: causal only).
REGISTERED_CASES = {"dsa": REGISTRY_CASES[-1:], "moba": ("segments_causal", "chunk_offsets")}


def _registered(name: str) -> Impl:
  def fn(q, k, v, mask, **case_options):
    options = REGISTRY_OPTIONS.get(name, lambda q, k: {})(q, k)
    return attention.get(name)(q, k, v, mask=mask, **options, **case_options)

  cases = REGISTERED_CASES.get(name, REGISTRY_CASES)
  needs_window = name == "local"
  return Impl(f"registered_{name}", fn, lambda c: c.name in cases and (
      c.window is not None or not needs_window), low_precision=False)


def _flash(implementation, block_sizes, interpret=False):
  return lambda q, k, v, mask, **options: attention.flash_attention(
      q, k, v, mask=mask, implementation=implementation, block_sizes=block_sizes,
      interpret=interpret, **options)


def all_blocks(q, k, block_size: int):
  """Block ids `[B, T, nbk]` selecting every key block: block-sparse attention == dense."""
  nbk = -(-k.shape[1] // block_size)
  return jnp.broadcast_to(jnp.arange(nbk, dtype=jnp.int32), (*q.shape[:2], nbk))


def _block_sparse(implementation, block_size, block_sizes):
  return lambda q, k, v, mask, **options: attention.block_sparse_attention(
      q, k, v, all_blocks(q, k, block_size), block_size=block_size, mask=mask,
      implementation=implementation, block_sizes=block_sizes,
      interpret=implementation == "pallas", **options)


def _sparse(implementation, block_sizes):
  return lambda q, k, v, mask, **options: attention.sparse_attention(
      q, k, v, all_keys(q, k), mask=mask, implementation=implementation,
      block_sizes=block_sizes, interpret=implementation == "pallas", **options)


IMPLEMENTATIONS = [
    Impl("flash_xla", _flash("xla", XLA_TILES), lambda c: True),
    Impl("flash_xla_default_tiles", _flash("xla", None),
         lambda c: c.name in ("causal_1000", "band_127_0", "len_100"), low_precision=False),
    Impl("flash_pallas_interpret", _flash("pallas", PALLAS_TILES, interpret=True),
         lambda c: c.small),
    Impl("sparse_xla_all_keys", _sparse("xla", SparseBlockSizes(block_q=16)),
         lambda c: c.name in SPARSE_CASES, low_precision=False, features=SPARSE_FEATURES),
    Impl("sparse_pallas_all_keys", _sparse("pallas", SparseBlockSizes(block_k=16)),
         lambda c: c.name in ("causal", "segments_window", "chunk_offsets", "len_7",
                              "soft_cap_segments", "value_dim_offsets", "sinks_decode_all"),
         low_precision=False, features=SPARSE_FEATURES),
    Impl("block_sparse_xla_all_blocks",
         _block_sparse("xla", 8, BlockSparseBlockSizes(block_entries=16)),
         lambda c: c.name in BLOCK_SPARSE_CASES, low_precision=False,
         features=BLOCK_SPARSE_FEATURES),
    Impl("block_sparse_pallas_all_blocks", _block_sparse("pallas", 16, None),
         lambda c: c.name in BLOCK_SPARSE_PALLAS_CASES, low_precision=False,
         features=BLOCK_SPARSE_FEATURES),
] + [_registered(name) for name in attention.available()]

PARAMS = [(impl, case, dtype) for impl in IMPLEMENTATIONS for case, dtype in case_dtypes(CASES)
          if impl.supports(case) and case.features <= impl.features
          and (dtype == "f32" or impl.low_precision)]


def _cotangent(q, v, options):
  """Fixed random cotangents of the output (and of the lse with `return_lse`)."""
  key_out, key_lse = jax.random.split(jax.random.key(123))
  cotangent = jax.random.normal(key_out, (*q.shape[:3], v.shape[3]), jnp.float32).astype(q.dtype)
  if options.get("return_lse"):
    b, t, n = q.shape[:3]
    cotangent = (cotangent, jax.random.normal(key_lse, (b, n, t), jnp.float32))
  return cotangent


def _output_and_grads(fn, q, k, v, mask, options):
  """`(out, (dq, dk, dv))` of `fn` in one jit against `_cotangent`; `out` is `(out, lse)` with
  `return_lse`. The mask is closed over: concrete offsets keep the band path."""
  @jax.jit
  def run(q, k, v, cotangent):
    out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, mask, **options), q, k, v)
    return out, pull(cotangent)

  return run(q, k, v, _cotangent(q, v, options))


@functools.lru_cache(maxsize=None)
def _reference(case: Case, dtype):
  """`reference_attention`'s output and gradients on `case` (the same for every implementation
  of the grid: computed and compiled once per case and dtype)."""
  q, k, v, mask = case.inputs(dtype)
  return _output_and_grads(
      lambda q, k, v, mask, **options: attention.reference_attention(q, k, v, mask=mask,
                                                                     **options),
      q, k, v, mask, case.options())


def worst_error(got, want, dtype, grad: bool) -> float:
  """max |got - want| / (atol + rtol |want|) in float32: <= 1 passes the DESIGN.md tolerance."""
  tol = tolerance(dtype, grad)
  got, want = (np.asarray(jnp.asarray(x, jnp.float32)) for x in (got, want))
  if not np.all(np.isfinite(got)):
    return float("inf")
  return float(np.max(np.abs(got - want) / (tol["atol"] + tol["rtol"] * np.abs(want)),
                      initial=0.0))


def lse_error(got, want, dtype) -> float:
  """`worst_error` of an lse `[B, N, T]`: -inf (no visible key) exactly where the reference's."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == np.float32 and got.shape == want.shape
  if not np.array_equal(np.isneginf(got), np.isneginf(want)):
    return float("inf")
  finite = ~np.isneginf(want)
  return worst_error(got[finite], want[finite], dtype, grad=False)


def errors(fn, case: Case, dtype) -> dict[str, float]:
  """Worst normalised errors of the output (and lse) and the gradients of `fn` on `case`."""
  q, k, v, mask = case.inputs(dtype)
  out, grads = _output_and_grads(fn, q, k, v, mask, case.options())
  ref, ref_grads = _reference(case, dtype)
  result = {}
  if case.lse:
    (out, lse), (ref, ref_lse) = out, ref
    result["lse"] = lse_error(lse, ref_lse, dtype)
  assert out.shape == (*q.shape[:3], v.shape[3]) and out.dtype == q.dtype
  result["out"] = worst_error(out, ref, dtype, grad=False)
  for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert got.dtype == want.dtype
    result[name] = worst_error(got, want, dtype, grad=True)
  return result


@pytest.mark.parametrize("impl,case,dtype", PARAMS,
                         ids=[f"{i.name}-{c.name}-{d}" for i, c, d in PARAMS])
def test_matches_reference(impl: Impl, case: Case, dtype: str):
  result = errors(impl.fn, case, DTYPES[dtype])
  assert max(result.values()) <= 1.0, result


# --- ring attention: 8 host devices, one subprocess for all its cases ----------------------------


def ring_grid() -> dict[str, dict[str, float]]:
  """Worker (tests/multidevice.py): ring attention over RING_CASES on an 8-device mesh."""
  devices = np.array(jax.devices())
  out = {}
  for name in RING_CASES:
    case = BY_NAME[name]
    p = max(d for d in (8, 4, 2) if case.q_len % d == 0)
    mesh = jax.sharding.Mesh(devices[:p], ("seq",))
    fn = lambda q, k, v, mask, mesh=mesh: attention.ring_attention_sharded(
        q, k, v, mask=mask, mesh=mesh, implementation="xla", block_sizes=XLA_TILES)
    out[name] = errors(fn, case, jnp.float32)
  return out


@functools.lru_cache(maxsize=None)
def _ring_results():
  return run_worker(__name__, "ring_grid", devices=8)


@pytest.mark.parametrize("name", RING_CASES)
def test_ring_matches_reference(name: str):
  assert BY_NAME[name].self_attention
  result = _ring_results()[name]
  assert max(result.values()) <= 1.0, result


# --- registered names: each contract option computed (== reference) or refused by name --------

OPTIONS_CASE = Case("options_tiny", batch=1, q_len=16, kv_len=16, heads=2, kv_heads=1,
                    head_dim=16, causal=True, window=(7, 0))  # "local" needs a window
FEATURE_SETTINGS = {"soft_cap": dict(soft_cap=1.5), "value_dim": dict(value_dim=8),
                    "alibi": dict(alibi=True), "lse": dict(lse=True), "sinks": dict(sinks=3),
                    "sink_logits": dict(sink_logits=True)}
# What each registered name refuses; every other (name, option) must equal the reference.
REFUSED = {"ring": FEATURES, "dsa": frozenset({"alibi", "sinks"}),
           "moba": frozenset({"alibi", "sinks"})}
# The word a refusal must contain.
OPTION_WORDS = {"soft_cap": "logits_soft_cap", "value_dim": "value head dim",
                "alibi": "alibi_slopes", "lse": "return_lse", "sinks": "Mask.sinks",
                "sink_logits": "sink_logits"}


@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("name", attention.available())
def test_registered_options_computed_or_refused(name: str, feature: str):
  case = dataclasses.replace(OPTIONS_CASE, **FEATURE_SETTINGS[feature])
  q, k, v, mask = case.inputs(jnp.float32)
  fn = jax.jit(lambda q, k, v: _registered(name).fn(q, k, v, mask, **case.options()))
  if feature in REFUSED.get(name, ()):
    with pytest.raises(ValueError, match=OPTION_WORDS[feature]):
      fn(q, k, v)
    return
  got = fn(q, k, v)
  want = attention.reference_attention(q, k, v, mask=mask, **case.options())
  if case.lse:
    (got, lse), (want, want_lse) = got, want
    assert lse_error(lse, want_lse, jnp.float32) <= 1.0
  assert worst_error(got, want, jnp.float32, grad=False) <= 1.0
