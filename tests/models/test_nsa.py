"""The "nsa" layer kind: the three branches and their sigmoid gates against NumPy from the
paper's formulas, decoding equals the forward pass, parameter and FLOP counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import flops
from models.config import ModelConfig
from models.kinds import KindSettings
from models.nsa import NsaAttention, nsa_kind
from models.transformer import Transformer
from tests.attention.test_nsa import paper_nsa_compressed
from tests.helpers import assert_close
from tests.models.test_decode import cached_logits, forward

VOCAB, T = 64, 16
TINY = dict(vocab_size=VOCAB, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64)
OPTIONS = dict(block_len=4, stride=2, select_block=4, top_n=2, local_blocks=1, window=3)


def nsa_config(**fields) -> ModelConfig:
  fields = dict(dict(layer_pattern=("nsa",), num_layers=1), **fields)
  return ModelConfig(kinds={"nsa": nsa_kind(**OPTIONS)}, **TINY, **fields)


def _gelu(x):  # jax.nn.gelu's tanh form
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _phi(module, blocks):
  """NumPy compression MLP: `[B, C, l, K, H] -> [B, C, K, H]`."""
  x = blocks + np.asarray(module.pos_embed[...])[None, None, :, None]
  hidden = np.einsum("bclkh,lhf->bckf", x, np.asarray(module.w1.kernel[...]))
  return _gelu(hidden + np.asarray(module.w1.bias[...])) @ np.asarray(module.w2.kernel[...])


def _attend(q, k, v, visible):
  """Softmax attention of one query `[H]` over keys `[S, H]` where `visible [S]`."""
  if not visible.any():
    return np.zeros(v.shape[-1])
  s = np.where(visible, k @ q / np.sqrt(q.shape[-1]), -np.inf)
  e = np.exp(s - s.max())
  return e @ v / e.sum()


def test_branches_and_gates_match_numpy():
  """out = sum_c sigmoid(x W_g + b)_c o_c with o_cmp over phi-compressed blocks, o_slc over the
  paper's top-n blocks (first and local forced), o_win over the last `window` keys."""
  module = NsaAttention(nsa_config(), "nsa", rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for param in (module.gate.bias, module.compress_k.pos_embed, module.compress_v.pos_embed):
    param[...] = jnp.asarray(rng.normal(size=param.shape), jnp.float32)
  x = jax.random.normal(jax.random.key(1), (2, T, 32))
  positions = jnp.broadcast_to(jnp.arange(T), (2, T))
  q, k, v = module.project(x, positions)
  got = nnx.jit(lambda m, *a: m.branches(*a, m.mask()))(module, x, q, k, v)
  q, k, v, x = (np.asarray(a, np.float64) for a in (q, k, v, x))
  l, d, ls, w = (OPTIONS[n] for n in ("block_len", "stride", "select_block", "window"))
  starts = np.arange((T - l) // d + 1) * d
  win = lambda a: np.stack([a[:, s:s + l] for s in starts], axis=1)  # B C l K H
  k_cmp, v_cmp = _phi(module.compress_k, win(k)), _phi(module.compress_v, win(v))
  o_cmp, chosen = paper_nsa_compressed(q, k_cmp, v_cmp, kv_len=T, l=l, d=d, ls=ls,
                                       top_n=OPTIONS["top_n"], initial=1, local=1)
  gate = 1 / (1 + np.exp(-(np.einsum("btd,dng->btng", x, np.asarray(module.gate.kernel[...]))
                           + np.asarray(module.gate.bias[...]))))
  want = np.zeros(q.shape)
  keys = np.arange(T)
  for b, t, n in np.ndindex(2, T, 4):
    kv = n // 2
    slc = np.isin(keys // ls, list(chosen[b, t, kv])) & (keys <= t)
    o_slc = _attend(q[b, t, n], k[b, :, kv], v[b, :, kv], slc)
    o_win = _attend(q[b, t, n], k[b, :, kv], v[b, :, kv], (keys <= t) & (keys > t - w))
    want[b, t, n] = gate[b, t, n] @ np.stack([o_cmp[b, t, n], o_slc, o_win])
  assert_close(got, want)


def test_decode_equals_forward():
  model = Transformer(nsa_config(), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, T), 0, VOCAB, jnp.int32)
  decoded, _ = cached_logits(model, tokens, 1)
  np.testing.assert_allclose(decoded, forward(model, tokens), atol=1e-4, rtol=1e-4)


def test_parameters_and_flops():
  """Compressors: pos embed l x H, W1 (l H) x F + F, W2 F x H, for k and v (F = H = 8);
  gates D x N x 3 + N x 3. FLOPs of the newest token at c keys: compressed (c - l) // d + 1,
  selected: all keys while c <= top_n l', else its own block's and top_n - 1 whole blocks,
  window min(c, w); plus the compression MLPs, 2 x 2 K (l H F + F H) / d per token."""
  config = nsa_config()
  counts = flops.param_counts(config)
  assert counts["compressor"] == 2 * (4 * 8 + 4 * 8 * 8 + 8 + 8 * 8)
  dense = flops.param_counts(ModelConfig(num_layers=1, **TINY))
  assert counts["attention"] - dense["attention"] == 32 * 4 * 3 + 4 * 3
  per_key, mlp = 4 * 4 * 8, 2 * 2 * 2 * (4 * 8 * 8 + 8 * 8) // 2
  for c, cmp, selected in ((1, 0, 1), (4, 1, 4), (8, 3, 8), (11, 4, 7), (16, 7, 8)):
    assert flops.attention_flops_per_token(config, c) == (
        per_key * (cmp + selected + min(c, 3)) + mlp), c


def test_refusals():
  with pytest.raises(ValueError, match=r"\(NSA\) needs a causal model and window=0"):
    Transformer(ModelConfig(layer_pattern=("nsa",), kinds={"nsa": KindSettings(window=8)},
                            **TINY), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"unknown NSA option\(s\) \['top_k'\]"):
    nsa_kind(top_k=3)
  with pytest.raises(ValueError, match="NSA option local_blocks must be an int >= 1"):
    nsa_kind(local_blocks=0)
