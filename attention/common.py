"""What the attention backends share: the lse custom_vjp, tile gradients, padding, dispatch.

A neutral module below both the front doors (`flash.py`, `sparse.py`, `ring.py`, which hold the
implementation tables users reach) and the backends (the XLA paths `flash_xla.py`, `band.py`,
`sparse_xla.py`, `ring_pass.py` and the Pallas kernels in `kernels/`). Backends import this
module, never a front door, so there is no import cycle.

* `Implementations`: one operation's name -> backend table; entries may be "module:attr"
  strings imported on first use (so the Pallas kernels load only when picked).
* `lse_vjp` / `with_lse_vjp`: the `jax.custom_vjp` around a `(forward -> (out, lse),
  backward from lse)` pair; every blockwise backend uses it. Gradients flow through both
  outputs (`row_delta` folds the lse cotangent into the softmax backward's delta).
* `finish_softmax`, `tile_grads`: the closing step of a softmax tile and the gradient of one
  score tile from the saved lse (shared by the tiled and the banded flash paths);
  `merge_partials`: the exact merge of per-chunk softmax partials (the decode paths).
* `pad_to_multiple`, `pad_to_size`, `round_block`, `next_pow2`: padding and tile sizes.
* `varying_axes`, `to_varying`, `varying_struct`: loop carries and Pallas outputs typed as
  device-varying under `jax.shard_map`'s default `check_vma=True` (a no-op outside shard_map
  and under `check_vma=False`).

lse convention everywhere: `[B, N, T]` float32 natural log, -inf for a row with no visible key.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attention.masks import Mask, q_offsets
from attention.scores import ScoreMods

# Queries per call up to which the front doors run their decode entries (`Implementations`
# `short_queries`): a decode step, a speculative-decoding draft, a small chunked-prefill step.
DECODE_MAX_Q_LEN = 16

# --- padding and tile sizes ----------------------------------------------------------------------


def pad_to_size(x, axis: int, size: int, value=0):
  """Pads `x` at the end of `axis` to length `size` with `value` (no copy when already there)."""
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def pad_to_multiple(x, axis: int, multiple: int, value=0):
  """Pads `x` at the end of `axis` to the next multiple of `multiple`."""
  return pad_to_size(x, axis, -(-x.shape[axis] // multiple) * multiple, value)


def next_pow2(x: int) -> int:
  """The smallest power of two >= x (1 for x <= 1)."""
  return 1 << max(0, int(x) - 1).bit_length()


def round_block(block: int, length: int, minimum: int = 8) -> int:
  """A tile no longer than a short sequence needs: min(block, next_pow2(length)), >= minimum."""
  return min(block, max(minimum, next_pow2(length)))


# --- implementation tables -----------------------------------------------------------------------


def _load(entry):
  if isinstance(entry, str):
    module, attr = entry.split(":")
    return getattr(importlib.import_module(module), attr)
  if isinstance(entry, tuple):
    return tuple(_load(e) for e in entry)
  return entry


class Implementations:
  """Name -> backend of one operation, held by the operation's front door (as tokamax's api.py).

  An entry is an object, a "module:attr" string (imported on first `get`), or a tuple of them.
  `resolve(None, interpret)` picks "pallas" on GPU or with `interpret`, "xla" elsewhere.

  Short queries: `short_queries={"xla": "xla_decode", ...}` with `short_max_q_len=16` makes
  `resolve(name, interpret, q_len)` return the mapped entry when `q_len <= short_max_q_len`
  (the decode paths of flash attention); naming the mapped entry itself picks it at any length.
  """

  def __init__(self, operation: str, *, short_queries: dict[str, str] | None = None,
               short_max_q_len: int = 0, **entries: Any):
    self.operation = operation
    self._entries = dict(entries)
    self.short_queries = dict(short_queries or {})
    self.short_max_q_len = short_max_q_len

  def register(self, name: str, entry: Any, *, overwrite: bool = False) -> None:
    if name in self._entries and not overwrite:
      raise ValueError(f"{self.operation} implementation {name!r} exists; pass overwrite=True.")
    self._entries[name] = entry

  def names(self) -> tuple[str, ...]:
    return tuple(self._entries)

  def resolve(self, implementation: str | None, interpret: bool, q_len: int | None = None) -> str:
    """The implementation name to use; a ValueError lists the known ones."""
    if implementation is None:
      implementation = "pallas" if interpret or jax.default_backend() == "gpu" else "xla"
    elif implementation not in self._entries:
      raise ValueError(f"{self.operation}: implementation must be one of {self.names()} or "
                       f"None, got {implementation!r}.")
    if interpret and not implementation.startswith("pallas"):
      raise ValueError(f"{self.operation}: interpret=True runs the Pallas kernels; "
                       f"implementation={implementation!r} has nothing to interpret.")
    if q_len is not None and q_len <= self.short_max_q_len:
      return self.short_queries.get(implementation, implementation)
    return implementation

  def get(self, name: str):
    entry = self._entries[name] = _load(self._entries[name])
    return entry


# --- device-varying types under shard_map ------------------------------------------------------
#
# Inside `jax.shard_map(..., check_vma=True)` (the default) every value's type records the mesh
# axes it varies over; `lax.cond` / `lax.switch` branches and loop carries must agree on them.
# A carry initialised from constants (zeros, -inf) is invarying while the tile updates that
# flow into it vary with q, k, v (and, in the ring, with `axis_index`): cast the initial carry.


def _varies_over(x) -> frozenset:
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)  # JAX >= 0.10: the manual axis type's `varying` set
  return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def varying_axes(*trees) -> tuple[str, ...]:
  """The mesh axes any array leaf of `trees` varies over (sorted); () outside shard_map."""
  axes = set()
  for leaf in jax.tree.leaves(trees):
    axes |= _varies_over(leaf)
  return tuple(sorted(axes, key=str))


def to_varying(tree, axes: str | tuple[str, ...]):
  """Every array leaf of `tree` cast to device-varying over `axes` (`lax.pcast(...,
  to="varying")`, formerly `lax.pvary`). Axes a leaf already varies over, and axes no
  enclosing shard_map binds, are left alone: a no-op outside shard_map and under
  `check_vma=False`."""
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  manual = getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())
  axes = tuple(a for a in axes if a in manual)  # only axes a shard_map binds here

  def cast(x):
    missing = tuple(a for a in axes if a not in _varies_over(x))
    if not missing:
      return x
    if hasattr(jax.lax, "pcast"):
      return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)  # JAX < 0.10

  return jax.tree.map(cast, tree)


def varying_struct(shape, dtype, *like) -> jax.ShapeDtypeStruct:
  """A `pallas_call` out_shape typed as varying over every shard_map axis `like` vary over
  (required under `check_vma=True`; the type is ignored outside shard_map)."""
  axes = frozenset(varying_axes(*like))
  leaves = jax.tree.leaves(like)
  mat = getattr(jax.typeof(leaves[0]), "mat", None) if leaves else None
  if mat is None:  # JAX < 0.10 spells the type `vma`
    return jax.ShapeDtypeStruct(shape, dtype, vma=axes)
  mat = mat.update(varying=axes, unreduced=frozenset(), reduced=frozenset())
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


# --- the lse custom_vjp --------------------------------------------------------------------------


def lse_vjp(forward: Callable, backward: Callable, *, lse_grad: bool = False) -> Callable:
  """`attend(q, k, v, aux, *static) -> out` with a `custom_vjp` from a blockwise pair.

  `forward(q, k, v, aux, *static) -> (out, lse)`; `backward(q, k, v, aux, out, lse, dout,
  *static) -> (dq, dk, dv)`. `aux` is a pytree of arrays (indices, segment ids, offsets, ALiBi
  slopes) with no cotangent; `static` are hashable settings. Residuals are the inputs, `out`
  and the float32 `lse`, so backward memory stays O(T + S).

  `lse_grad=True`: `attend` returns `(out, lse)` and `backward` also gets `dlse=` (the lse
  cotangent `[B, N, T]`; `row_delta` folds it into delta, since d lse / d s = p).
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
  def attend(q, k, v, aux, static):
    return forward(q, k, v, aux, *static)

  def attend_fwd(q, k, v, aux, static):
    out, lse = forward(q, k, v, aux, *static)
    return (out, lse), (q, k, v, aux, out, lse)

  def attend_bwd(static, res, cotangents):
    q, k, v, aux, out, lse = res
    dout, dlse = cotangents
    extra = dict(dlse=dlse) if lse_grad else {}
    dq, dk, dv = backward(q, k, v, aux, out, lse, dout, *static, **extra)
    return dq, dk, dv, None

  attend.defvjp(attend_fwd, attend_bwd)
  if lse_grad:
    return lambda q, k, v, aux, *static: attend(q, k, v, aux, static)
  return lambda q, k, v, aux, *static: attend(q, k, v, aux, static)[0]


def with_lse_vjp(forward: Callable, backward: Callable) -> Callable:
  """`lse_vjp` for a pair that takes a `Mask` and `ScoreMods`:
  `attend(q, k, v, mask, scale, mods, *static) -> (out, lse)`, differentiable in both.

  `forward(q, k, v, mask, scale, *static, mods=) -> (out, lse)` and `backward(q, k, v, out,
  lse, dout, mask, scale, *static, mods=, dlse=) -> (dq, dk, dv)`. The mask's array leaves
  (segment ids, offsets) and the ALiBi slopes travel as primal inputs with no cotangent; the
  mask's static structure (causal, window, sinks), the soft-cap and `scale` are static arguments.
  """

  def fwd(q, k, v, arrays, mask_static, scale, *static):
    mask, mods = _rebuild(mask_static, arrays)
    return forward(q, k, v, mask, scale, *static, mods=mods)

  def bwd(q, k, v, arrays, out, lse, dout, mask_static, scale, *static, dlse):
    mask, mods = _rebuild(mask_static, arrays)
    return backward(q, k, v, out, lse, dout, mask, scale, *static, mods=mods, dlse=dlse)

  attend = lse_vjp(fwd, bwd, lse_grad=True)

  def call(q, k, v, mask: Mask, scale: float, mods: ScoreMods, *static):
    segments = (mask.q_segment_ids, mask.kv_segment_ids) if mask.has_segments else None
    arrays = (segments, q_offsets(mask, q.shape[0]), mods.alibi_slopes)
    return attend(q, k, v, arrays, (mask.causal, mask.window, mask.sinks, mods.soft_cap), scale,
                  *static)

  return call


def _rebuild(mask_static, arrays) -> tuple[Mask, ScoreMods]:
  (causal, window, sinks, soft_cap), (segments, offsets, slopes) = mask_static, arrays
  q_seg, kv_seg = segments if segments is not None else (None, None)
  return (Mask(causal=causal, window=window, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
               q_offset=offsets, sinks=sinks), ScoreMods(soft_cap, slopes))


def row_delta(out, dout, dlse=None):
  """`delta [B, T, N]` float32 = rowsum(out * dout) - dlse: the softmax backward's row term.

  With an lse cotangent `dlse [B, N, T]` the score gradient is `p * (dp - delta + dlse)`
  (d lse / d s = p), so it folds into delta and the tile gradients do not change.
  """
  delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)
  if dlse is not None:
    delta = delta - jnp.swapaxes(dlse, 1, 2).astype(jnp.float32)
  return delta


# --- softmax tiles --------------------------------------------------------------------------------


def finish_softmax(m, l, acc, dtype):
  """`(out, lse)` of a softmax tile from its max `m`, denominator `l`, numerator `acc [..., H]`.

  A row with no visible key (`l == 0`) gets out 0 and lse -inf, never NaN.
  """
  has_key = l > 0
  l_safe = jnp.where(has_key, l, 1.0)
  lse = jnp.where(has_key, m + jnp.log(l_safe), -jnp.inf)
  return (acc / l_safe[..., None]).astype(dtype), lse


def merge_partials(m, l, acc, axis: int, dtype):
  """`(out, lse)` of a softmax over disjoint key sets from their partials (flash-decoding).

  Each set `i` (along `axis` of `m`, `l` `[..]` and `acc` `[.., Hv]`) holds its running max `m_i`,
  denominator `l_i = sum exp(s - m_i)` and numerator `acc_i = sum exp(s - m_i) v`; the merge
  rescales them to the common max: exact, whatever the split. Sets with no visible key
  (`m_i = -inf`, `l_i = 0`) weigh 0; a row with none at all gets out 0 and lse -inf.
  """
  m_all = jnp.max(m, axis=axis)
  safe = jnp.where(m_all == -jnp.inf, 0.0, m_all)
  w = jnp.exp(m - jnp.expand_dims(safe, axis))
  return finish_softmax(m_all, jnp.sum(l * w, axis=axis), jnp.sum(acc * w[..., None], axis=axis),
                        dtype)


def backward_lse(lse):
  """The saved lse for recomputing p: rows with no visible key (-inf) become +inf, so p = 0."""
  return jnp.where(jnp.isfinite(lse), lse, jnp.inf)


def tile_grads(s, q_i, k_j, v_j, do_i, lse_i, delta_i, scale: float, dcap=None):
  """Gradients of one score tile from the saved lse; float32 results.

  `s [B, K, G, t, s]` masked (modified) logits (hidden keys -inf), `q_i, do_i [B, K, G, t, H]`,
  `k_j [B, K, s, H]`, `v_j [B, K, s, Hv]`, `lse_i, delta_i [B, K, G, t]` (`row_delta`),
  `dcap`: the soft-cap's derivative on the tile (`ScoreMods.apply`) or None.
  Returns `(dq_i [B, K, G, t, H], dk_j [B, K, s, H], dv_j [B, K, s, Hv])`::

      p = exp(s - lse);  dv = p^T do;  ds = p * (do v^T - delta) * dcap * scale
      dk = ds^T q;  dq = ds k
  """
  f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  p = jnp.exp(s - lse_i[..., None])
  dv = f32("BKGts,BKGtH->BKsH", p.astype(do_i.dtype), do_i)
  dp = f32("BKGtH,BKsH->BKGts", do_i, v_j)
  ds = p * (dp - delta_i[..., None]) * scale
  if dcap is not None:
    ds = ds * dcap
  dk = f32("BKGts,BKGtH->BKsH", ds.astype(q_i.dtype), q_i)
  dq = f32("BKGts,BKsH->BKGtH", ds.astype(k_j.dtype), k_j)
  return dq, dk, dv
