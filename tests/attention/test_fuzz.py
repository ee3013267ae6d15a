"""Property-based tests (hypothesis): random shapes, masks, dtypes and options for every attention
implementation against the reference, values and gradients; invalid inputs always a ValueError.

The valid cases are `tests.attention.grid.Case`s drawn at random: batch, query and key lengths
(odd ones included), heads and kv heads (GQA/MQA), head dims (odd ones where supported), a
value head dim, causal / windows / segment ids with padding / query offsets (ints and per-row
arrays), soft-cap, ALiBi and return_lse, float32 / bfloat16 / float16, and the seed of the
inputs. Each drawn case runs one implementation of the shared grid's table (`FUZZED`, from
`tests.attention.test_grid`: the same comparison, `errors`, and the DESIGN.md tolerances).

CI runs a bounded, derandomised number of examples (`EXAMPLES`); a larger random run:

    LONGCTX_FUZZ_EXAMPLES=500 python -m pytest tests/attention/test_fuzz.py -n 2

(hypothesis prints the falsifying case, which `Case(...)` reproduces directly).
"""

from __future__ import annotations

import dataclasses
import math
import os

import hypothesis
from hypothesis import strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import Mask
from tests.attention.grid import DTYPES, Case
from tests.attention.test_grid import IMPLEMENTATIONS, errors

_RANDOM = "LONGCTX_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("LONGCTX_FUZZ_EXAMPLES", "12"))
SETTINGS = hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=not _RANDOM,
                               print_blob=True, database=None,
                               suppress_health_check=list(hypothesis.HealthCheck))

# The grid's implementations that take any case of their kind (not only the named grid cases):
# name -> (what it needs of a case, whether it runs low-precision dtypes).
FUZZED = {
    "flash_xla": (lambda c: True, True),
    "flash_pallas_interpret": (lambda c: max(c.q_len, c.kv_len) <= 48 and c.head_dim % 8 == 0,
                               True),
    "sparse_xla_all_keys": (lambda c: True, False),
    "registered_dense": (lambda c: True, False),
    "registered_flash": (lambda c: True, False),
    "registered_local": (lambda c: c.window is not None, False),
    "registered_moba": (lambda c: c.causal and not c.alibi and not c.sinks, False),
}
IMPLS = {impl.name: impl for impl in IMPLEMENTATIONS if impl.name in FUZZED}


@st.composite
def cases(draw) -> tuple[str, Case, str]:
  """`(implementation name, case, dtype name)` with a case that implementation supports."""
  name = draw(st.sampled_from(sorted(IMPLS)))
  needs, low_precision = FUZZED[name]
  impl = IMPLS[name]
  kv_heads = draw(st.integers(1, 3))
  heads = kv_heads * draw(st.integers(1, 3))
  q_len = draw(st.integers(1, 40))
  self_attention = draw(st.booleans())
  kv_len = q_len if self_attention else draw(st.integers(1, 48))
  window = draw(st.none() | st.tuples(st.integers(0, 20), st.integers(0, 20)))
  offset = 0
  if not self_attention:  # decode / chunked prefill / cross attention
    offset = draw(st.integers(-4, 48) | st.tuples(st.integers(-4, 48), st.integers(-4, 48)))
  batch = 2 if isinstance(offset, tuple) else draw(st.integers(1, 2))
  features = draw(st.sets(st.sampled_from(sorted(impl.features))))
  case = Case(
      name="fuzz", batch=batch, q_len=q_len, kv_len=kv_len, heads=heads, kv_heads=kv_heads,
      head_dim=draw(st.sampled_from([8, 16, 24, 32, 40] if "pallas" in name
                                    else [2, 6, 8, 14, 16, 30, 32])),
      causal=draw(st.booleans()), window=window, q_offset=offset,
      segments=draw(st.integers(1, 4)) if self_attention and draw(st.booleans()) else 0,
      soft_cap=draw(st.sampled_from([0.5, 2.0, 30.0])) if "soft_cap" in features else None,
      value_dim=draw(st.sampled_from([8, 12, 48])) if "value_dim" in features else None,
      alibi="alibi" in features, lse="lse" in features,
      sinks=draw(st.integers(1, 20)) if "sinks" in features else 0,
      sink_logits="sink_logits" in features, seed=draw(st.integers(0, 2**16)))
  hypothesis.assume(needs(case))
  dtype = draw(st.sampled_from(["f32", "bf16", "f16"])) if low_precision else "f32"
  return name, case, dtype


@SETTINGS
@hypothesis.given(cases())
def test_fuzzed_cases_match_the_reference(drawn):
  name, case, dtype = drawn
  result = errors(IMPLS[name].fn, case, DTYPES[dtype])
  assert max(result.values()) <= 1.0, (name, dtype, case, result)


# --- invalid inputs: a ValueError naming the problem, before anything is traced ---------------


def _qkv(b=1, t=8, s=8, n=4, kh=2, h=16, hv=None, dtype=jnp.float32):
  rng = np.random.default_rng(0)
  make = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  return make(b, t, n, h), make(b, s, kh, h), make(b, s, kh, hv or h)


def _wrong_rank():
  q, k, v = _qkv()
  return (q[0], k, v), {}, "rank 4"


def _mismatched_heads():
  q, k, v = _qkv(n=3, kh=2)
  return (q, k, v), {}, "multiple of kv heads"


def _mismatched_head_dim():
  q, _, _ = _qkv(h=16)
  _, k, v = _qkv(h=8)
  return (q, k, v), {}, "head_dim"


def _mismatched_batch():
  q, _, _ = _qkv(b=2)
  _, k, v = _qkv(b=1)
  return (q, k, v), {}, "batch"


def _integer_inputs():
  q, k, v = _qkv()
  return (q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32)), {}, "floating"


def _segment_shape():
  q, k, v = _qkv(b=2, t=8, s=8)
  ids = jnp.zeros((2, 7), jnp.int32)
  return (q, k, v), dict(mask=Mask(q_segment_ids=ids, kv_segment_ids=ids)), "segment_ids"


def _float_segments():
  q, k, v = _qkv(b=1, t=8, s=8)
  ids = jnp.zeros((1, 8), jnp.float32)
  return (q, k, v), dict(mask=Mask(q_segment_ids=ids, kv_segment_ids=ids)), "segment_ids"


def _offset_shape():
  q, k, v = _qkv(b=2)
  return (q, k, v), dict(mask=Mask(causal=True, q_offset=jnp.zeros((3,), jnp.int32))), "q_offset"


def _nan_scale():
  return _qkv(), dict(scale=math.nan), "scale"


def _mask_type():
  return _qkv(), dict(mask=np.ones((8, 8), bool)), "attention.Mask"


INVALID = {f.__name__.lstrip("_"): f for f in (
    _wrong_rank, _mismatched_heads, _mismatched_head_dim, _mismatched_batch, _integer_inputs,
    _segment_shape, _float_segments, _offset_shape, _nan_scale, _mask_type)}
# Every registered name (with the options it needs to get past its own argument checks) and
# the front doors with their non-default implementations.
CAUSAL_ONLY = ("moba",)  # given a causal mask where the problem brings none


def _registered(name):
  def call(q, k, v, **kw):
    if name in CAUSAL_ONLY:
      kw.setdefault("mask", Mask(causal=True))
    return attention.get(name)(q, k, v, **kw)
  return call


CALLERS = {name: _registered(name)
           for name in attention.available() if name not in ("dsa", "local", "ring")}
CALLERS.update(
    local=lambda q, k, v, **kw: attention.local_attention(q, k, v, window=4, **kw),
    flash_pallas=lambda q, k, v, **kw: attention.flash_attention(
        q, k, v, implementation="pallas", interpret=True, **kw),
    sparse=lambda q, k, v, **kw: attention.sparse_attention(
        q, k, v, jnp.zeros((*q.shape[:2], 2), jnp.int32), **kw),
    ring=lambda q, k, v, **kw: attention.ring_attention_sharded(
        q, k, v, mesh=jax_mesh(), **kw),
)


def jax_mesh():
  import jax  # pylint: disable=g-import-not-at-top
  return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("seq",))


@pytest.mark.parametrize("caller", sorted(CALLERS))
@pytest.mark.parametrize("problem", sorted(INVALID))
def test_invalid_inputs_raise_value_error(caller, problem):
  args, kwargs, words = INVALID[problem]()
  with pytest.raises(ValueError, match=words):
    CALLERS[caller](*args, **kwargs)


@hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=not _RANDOM,
                     database=None)
@hypothesis.given(left=st.integers(-3, 3), right=st.integers(-3, 3),
                  kind=st.sampled_from(["int", "float", "triple"]))
def test_bad_windows_are_refused_by_the_mask(left, right, kind):
  window = {"int": (left, right), "float": (float(left), right), "triple": (left, right, 0)}[kind]
  if kind == "int" and left >= 0 and right >= 0:
    assert Mask(window=window).window == (left, right)
    return
  with pytest.raises(ValueError, match="window"):
    Mask(window=window)


def test_the_fuzzed_table_names_real_implementations():
  assert set(IMPLS) == set(FUZZED), set(FUZZED) - set(IMPLS)
  assert dataclasses.is_dataclass(Case)
