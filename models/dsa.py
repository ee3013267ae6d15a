"""DeepSeek Sparse Attention (DSA) layer kind: main attention + lightning indexer per layer.

    ModelConfig(layer_pattern=("dsa",), kinds={"dsa": KindSettings(options=dict(
        top_k=64, index_heads=4, index_dim=32, stage="sparse"))})

`DsaAttention` reuses `layers.Attention` (its q/k/v/o projections, RoPE and `Mask`) and adds
an `Indexer` (DeepSeek-V3.2-Exp, shared/specs/dsa.md):

    q_I = x W_q               [B, T, J, D]   J = index_heads, D = index_dim
    k_I = LayerNorm(x W_k)    [B, T, D]      one key per token, shared by the J heads
    w   = (x W_w) * J^-0.5 * D^-0.5   [B, T, J]   per-head weights of the query token
    I[t, s] = sum_j w[t, j] ReLU(q_I[t, j] . k_I[s])

with RoPE (the kind's theta) on the first `rope_dims` dims of q_I and k_I (default D / 2).
With `fp8` the indexer scores in float8_e4m3fn with one float32 scale per `fp8_block` dims
(`attention/fp8.py`), and q_I, k_I are first rotated by the normalised Walsh-Hadamard
transform (`hadamard`, on by default with fp8; orthogonal, so the float32 scores are unchanged).
The indexer reads `stop_gradient(x)`: it learns only from its KL loss and never pushes
gradients into the main model.

Stages (`DsaSettings.stage`):
  * "dense" (warm-up): attention stays dense (flash, causal); the KL target is the dense main
    attention distribution, `KL(p || softmax(I))` over every visible key. O(T * S) memory:
    train it at warm-up lengths.
  * "sparse": every query attends to its `top_k` indexer-selected keys
    (the kind's registered attention, `attention.dsa_attention` by default: blockwise exact
    top-k + top-k gather attention, no gradient through the selection); the KL is restricted to the selected set. O(T * top_k) memory.
Either way `aux["indexer_kl"]` holds the (mean over query rows) KL, float32 scalar; with the
`recall` option (evaluation) also `aux["indexer_recall"]`, the share of the dense attention
mass on the selected keys.

Decoding caches the main K/V (`FullCache`, absolute positions, keys after RoPE) and the indexer
keys `k_I` (after RoPE and rotation; with fp8 as float8 values plus their block scales, about a
quarter of the float32 bytes, as DeepSeek's cache); each new token selects its top-k over the
whole cache, so token-by-token decoding computes exactly what the full forward does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jaxtyping import Array, Float, Int

import attention
from attention import fp8 as fp8_lib
from models import cache as cache_lib
from models import layers
from models.kinds import KindSettings, LayerKind, register_layer_kind, settings_from_options

STAGES = ("dense", "sparse")


# --- settings ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DsaSettings:
  """DSA options of a layer kind (given as `KindSettings.options`, so configs stay hashable).

  Attributes:
    index_heads: J, lightning-indexer heads (DeepSeek: 64).
    index_dim: D, indexer head width, even (DeepSeek: 128).
    rope_dims: dims of q_I / k_I that get RoPE (the first ones); None = index_dim // 2.
    top_k: keys each query attends to in the sparse stage (DeepSeek: 2048).
    fp8: score the indexer in float8_e4m3fn (block scales, float32 accumulation); the decode
      cache then keeps the indexer keys in float8.
    fp8_block: dims per FP8 scale (must divide index_dim); None = min(index_dim, 128).
    fp8_pow2: FP8 scales rounded up to powers of two (DeepSeek's "ue8m0").
    hadamard: rotate q_I and k_I by the normalised Walsh-Hadamard transform (index_dim a power
      of two); None = on exactly when fp8 is.
    stage: "dense" (warm-up: dense attention, dense KL) or "sparse" (top-k attention).
    block_q: queries per block of the indexer's top-k selection; None = the backend's default
      (`attention.indexer_topk`: 16 on CPU, 256 on GPU).
    recall: also report `aux["indexer_recall"]`, the share of the dense attention mass that
      falls on the top_k keys the indexer selects (mean over queries that see a key), and
      `aux["selection_recall"]`, the share of the dense attention's own top_k keys (summed
      over heads) that the indexer selects. Costs
      the dense O(T * S) target: for evaluation (`experiments.evaluate`), not training.
  """

  index_heads: int = 4
  index_dim: int = 32
  rope_dims: int | None = None
  top_k: int = 2048
  fp8: bool = False
  fp8_block: int | None = None
  fp8_pow2: bool = False
  hadamard: bool | None = None
  stage: str = "sparse"
  block_q: int | None = None
  recall: bool = False

  def __post_init__(self):
    for name in ("index_heads", "index_dim", "top_k", "block_q"):
      value = getattr(self, name)
      if name == "block_q" and value is None:
        continue
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"DSA option {name} must be a positive int, got {value!r}.")
    if self.index_dim % 2:
      raise ValueError(f"DSA option index_dim must be even (RoPE), got {self.index_dim}.")
    if self.rope_dims is None:
      object.__setattr__(self, "rope_dims", self.index_dim // 2 // 2 * 2)
    if (not isinstance(self.rope_dims, int) or self.rope_dims % 2 or
        not 0 <= self.rope_dims <= self.index_dim):
      raise ValueError(f"DSA option rope_dims must be an even int in [0, index_dim="
                       f"{self.index_dim}], got {self.rope_dims!r}.")
    if self.stage not in STAGES:
      raise ValueError(f"DSA option stage must be one of {STAGES}, got {self.stage!r}.")
    if self.hadamard is None:
      object.__setattr__(self, "hadamard", self.fp8)
    for name in ("fp8", "fp8_pow2", "hadamard", "recall"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"DSA option {name} must be a bool, got {getattr(self, name)!r}.")
    if self.hadamard and self.index_dim & (self.index_dim - 1):
      raise ValueError(f"DSA option hadamard needs a power-of-two index_dim, got "
                       f"{self.index_dim} (or set hadamard=False).")
    fp8_lib.Fp8Format(self.fp8_block, self.fp8_pow2).block_for(self.index_dim)  # validates

  @property
  def fp8_format(self) -> fp8_lib.Fp8Format | None:
    """The indexer's FP8 format, or None for the float32 path."""
    if not self.fp8:
      return None
    block = self.fp8_block or min(self.index_dim, fp8_lib.DEFAULT_BLOCK)
    return fp8_lib.Fp8Format(block, self.fp8_pow2)

  @classmethod
  def from_options(cls, options: Mapping[str, Any] | tuple | None) -> "DsaSettings":
    """From a kind's `options` (mapping or pairs); unknown names raise a ValueError."""
    return settings_from_options(cls, options, "DSA")


# --- indexer ---------------------------------------------------------------------------------------


class Indexer(nnx.Module):
  """Lightning indexer projections: `x [B, T, D_model]` -> `(q_I, k_I, w)` (module docstring)."""

  def __init__(self, config, settings: DsaSettings, rope, *, rngs: nnx.Rngs):
    d, j, e = config.d_model, settings.index_heads, settings.index_dim
    dense = functools.partial(nnx.Linear, use_bias=False, dtype=config.dtype,
                              param_dtype=config.param_dtype, rngs=rngs)
    self.wq = nnx.Einsum("BTd,dJE->BTJE", (d, j, e), dtype=config.dtype,
                         param_dtype=config.param_dtype,
                         kernel_init=layers.fan_in_init(0, (1, 2)), rngs=rngs)
    self.wk = dense(d, e)
    self.k_norm = nnx.LayerNorm(e, epsilon=config.norm_eps, dtype=config.dtype,
                                param_dtype=config.param_dtype, rngs=rngs)
    self.ww = dense(d, j)
    # DeepSeek: weights_proj(x) * n_heads**-0.5 * softmax_scale (= head_dim**-0.5). Does not
    # change the top-k; sets the temperature of softmax(I) in the KL loss.
    self.head_scale = j ** -0.5 * e ** -0.5
    self.rope_dims = settings.rope_dims
    self.hadamard = settings.hadamard
    self.rope = dataclasses.replace(rope, head_dim=settings.rope_dims) if settings.rope_dims else None

  def _rotate(self, x: Float[Array, "B T J E"], positions) -> Float[Array, "B T J E"]:
    """RoPE on the first `rope_dims` dims (half-split layout within them), the rest unrotated."""
    if self.rope is None:
      return x
    return jnp.concatenate([self.rope(x[..., :self.rope_dims], positions),
                            x[..., self.rope_dims:]], axis=-1)

  def __call__(self, x: Float[Array, "B T D"], positions: Int[Array, "B T"]):
    """`(index_q [B, T, J, E], index_k [B, T, E], index_w [B, T, J])`."""
    q = self._rotate(self.wq(x), positions)
    k = self._rotate(self.k_norm(self.wk(x))[:, :, None], positions)[:, :, 0]
    if self.hadamard:  # DeepSeek's rotate_activation, after RoPE, before FP8
      q, k = fp8_lib.hadamard(q), fp8_lib.hadamard(k)
    w = self.ww(x) * self.head_scale
    return q, k, w


# --- cache ---------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DsaCache:
  """Main K/V of every position (`FullCache`) and the indexer keys `index_k [B, L, E]`: an
  array, or (FP8) `fp8.Quantized` float8 values `[B, L, E]` + float32 scales `[B, L, E / block]`
  in the static `fp8` format (new keys are quantised on the way in)."""

  kv: cache_lib.FullCache
  index_k: Float[Array, "B L E"] | fp8_lib.Quantized
  fp8: fp8_lib.Fp8Format | None = dataclasses.field(default=None, metadata=dict(static=True))

  def update(self, index, k, v, segment_ids, index_k):
    """Writes the chunk at `index ..`; returns `((k, v, kv_segment_ids, q_offset, index_k), new)`."""
    (k_all, v_all, seg_all, q_offset), kv = self.kv.update(index, k, v, segment_ids)
    new = index_k if self.fp8 is None else fp8_lib.quantize(index_k, self.fp8)
    write = lambda buf, x: lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), index, 1)
    ik = jax.tree.map(write, self.index_k, new)
    return (k_all, v_all, seg_all, q_offset, ik), DsaCache(kv, ik, self.fp8)


# --- the layer -----------------------------------------------------------------------------------


class DsaAttention(layers.Attention):
  """`layers.Attention` whose keys are chosen per query by a lightning indexer (DSA).

  Same protocol as `layers.Attention`: `__call__(x, *, positions, segment_ids, cache,
  cache_index) -> (y, cache, aux)` with `aux = {"indexer_kl": scalar}`, and `init_cache`.
  Options come from the kind's `KindSettings.options` (`DsaSettings`); the kind must be causal
  and unwindowed (DSA selects among all earlier tokens).
  """

  def __init__(self, config, kind: str, *, rngs: nnx.Rngs):
    super().__init__(config, kind, rngs=rngs)
    self.dsa = DsaSettings.from_options(self.options)
    self.require_plain_causal("DSA", scale=True, reason="it uses RoPE; its attention and "
                              "indexer target use head_dim ** -0.5")
    self.indexer = Indexer(config, self.dsa, self.rope, rngs=rngs)

  @classmethod
  def attention_flops(cls, config, kind: str, keys):
    """Sparse stage: `top_k` keys attended + the indexer's score of every visible key (the
    ReLU, head weights and top-k not counted); dense stage: dense attention."""
    dsa = DsaSettings.from_options(config.kind_settings(kind).options)
    if dsa.stage != "sparse":
      return super().attention_flops(config, kind, keys)
    return (super().attention_flops(config, kind, np.minimum(keys, dsa.top_k))
            + 2 * dsa.index_heads * dsa.index_dim * keys)

  def __call__(self, x: Float[Array, "B T D"], *, positions: Int[Array, "B T"],
               segment_ids: Int[Array, "B T"] | None = None, cache=None,
               cache_index=None) -> tuple[Float[Array, "B T D"], Any, dict]:
    q, k, v = self.project(x, positions)  # B T N H, B T K H, B T K H
    iq, ik, iw = self.indexer(lax.stop_gradient(x), positions)  # detached from the main model
    if cache is None:
      mask = self.mask(segment_ids, segment_ids)
    else:
      if segment_ids is None:
        segment_ids = jnp.zeros(x.shape[:2], jnp.int32)
      (k, v, kv_segment_ids, q_offset, ik), cache = cache.update(cache_index, k, v, segment_ids, ik)
      mask = self.mask(segment_ids, kv_segment_ids, q_offset)
    out, aux = STAGE_FNS[self.dsa.stage](self, q, k, v, iq, ik, iw, mask)
    indices = aux.pop("indices", None)  # the sparse stage's selection, reused by the report
    if self.dsa.recall:
      aux["indexer_recall"], aux["selection_recall"] = self._recall(q, k, iq, ik, iw, mask,
                                                                    indices)
    return self.o_proj(out), cache, aux

  def _select(self, iq, ik, iw, mask):
    """`[B, T, top_k]` indices of the indexer's top-k visible keys (no gradient)."""
    s = self.dsa
    return attention.indexer_topk(lax.stop_gradient(iq), lax.stop_gradient(ik),
                                    lax.stop_gradient(iw), top_k=s.top_k, mask=mask,
                                    fp8=s.fp8_format, block_q=s.block_q)

  def _dense(self, q, k, v, iq, ik, iw, mask):
    """Warm-up: dense causal attention; KL over every visible key."""
    out = attention.flash_attention(q, k, v, mask=mask)
    scores = attention.indexer_scores(iq, ik, iw, mask=mask, fp8=self.dsa.fp8_format)
    target = attention.attention_target(q, k, mask=mask)
    return out, {"indexer_kl": attention.indexer_kl_loss(scores, target)}

  def _sparse(self, q, k, v, iq, ik, iw, mask):
    """Top-k attention; KL restricted to the selected set."""
    indices = self._select(iq, ik, iw, mask)  # B T top_k
    # Through the registry (the kind's attention, "dsa" by default), reusing the selection.
    out = attention.get(self.attention_name)(
        q, k, v, mask=mask, index_q=iq, index_k=ik, index_w=iw, top_k=self.dsa.top_k,
        fp8=self.dsa.fp8_format, indices=indices)
    scores = attention.indexer_scores_at(iq, ik, iw, indices, fp8=self.dsa.fp8_format)
    target = attention.attention_target(q, k, mask=mask, indices=indices)
    return out, {"indexer_kl": attention.indexer_kl_loss(scores, target), "indices": indices}

  def _recall(self, q, k, iq, ik, iw, mask, indices=None):
    """Over the rows that see a key: the mean share of the dense attention distribution on
    the selected keys, and the mean share of the dense distribution's top_k keys selected."""
    if indices is None:
      indices = self._select(iq, ik, iw, mask)
    target = attention.attention_target(q, k, mask=mask)  # B T S, rows sum to 1 or 0
    has_key = jnp.sum(target, axis=-1) > 0
    mass = attention.selected_mass(target, indices)
    mean = lambda x, rows: jnp.sum(jnp.where(rows, x, 0.0)) / jnp.maximum(jnp.sum(rows), 1)
    recall, rows = attention.selection_recall(target, indices, min(self.dsa.top_k, k.shape[1]))
    return mean(mass, has_key), mean(recall, rows)

  def init_cache(self, batch: int, max_len: int) -> DsaCache:
    """Every position of K/V and of the indexer keys (top-k looks at the whole stream)."""
    kv = cache_lib.FullCache.create(batch, max_len, self.num_kv_heads, self.head_dim, self.dtype)
    e, fmt = self.dsa.index_dim, self.dsa.fp8_format
    if fmt is None:
      return DsaCache(kv, jnp.zeros((batch, max_len, e), self.dtype))
    blocks = e // fmt.block_for(e)
    index_k = fp8_lib.Quantized(jnp.zeros((batch, max_len, e), fp8_lib.FP8_DTYPE),
                                jnp.ones((batch, max_len, blocks), jnp.float32))
    return DsaCache(kv, index_k, fmt)

  # --- counts (models.flops) -------------------------------------------------------------------

  @staticmethod
  def cache_bytes(config, kind: str, batch: int, max_len: int) -> int:
    """Bytes of `init_cache(batch, max_len)`: the K/V of every position and the indexer keys
    (`E` values per token in the compute dtype, or float8 + one float32 scale per block)."""
    s = DsaSettings.from_options(config.kind_settings(kind).options)
    kv = cache_lib.kv_nbytes(batch, max_len, config.num_kv_heads, config.head_dim, config.dtype)
    fmt = s.fp8_format
    per_token = (s.index_dim * jnp.dtype(config.dtype).itemsize if fmt is None else
                 s.index_dim * jnp.dtype(fp8_lib.FP8_DTYPE).itemsize
                 + 4 * (s.index_dim // fmt.block_for(s.index_dim)))
    return kv + batch * max_len * per_token


STAGE_FNS = {"dense": DsaAttention._dense, "sparse": DsaAttention._sparse}  # pylint: disable=protected-access


# The indexer's parameters (`nnx.state(model, INDEXER_PARAMS)`): what the warm-up stage trains.
INDEXER_PARAMS = nnx.All(nnx.Param, nnx.PathContains("indexer"))
MAIN_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("indexer")))


def indexer_kl(aux: Mapping[str, Any]) -> Float[Array, ""]:
  """Mean of `aux["layers"][i]["indexer_kl"]` over the DSA layers of a model (0 if none)."""
  losses = [layer["indexer_kl"] for layer in aux["layers"] if "indexer_kl" in layer]
  return sum(losses) / len(losses) if losses else jnp.zeros((), jnp.float32)


def set_recall(model: nnx.Module, on: bool = True) -> int:
  """Turns the `recall` report of every DSA layer in `model` on (or off); returns how many.

  The settings are static, so jitted calls retrace once. Used by `experiments.evaluate`.
  """
  layers_found = 0
  for _, module in nnx.iter_modules(model):
    if isinstance(module, DsaAttention):
      module.dsa = dataclasses.replace(module.dsa, recall=on)
      layers_found += 1
  return layers_found


def dsa_kind(**options) -> KindSettings:
  """`KindSettings` overriding the "dsa" kind's options, e.g. `dsa_kind(top_k=64)`."""
  DsaSettings.from_options(options)  # validate early
  return KindSettings(options=options)


register_layer_kind("dsa", LayerKind(KindSettings("dsa", 0, 10_000.0), module=DsaAttention))
