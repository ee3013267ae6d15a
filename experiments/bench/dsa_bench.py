r"""DSA measurements on the CPU: one decode step vs dense, and FP8 top-k agreement.

    python -m experiments.benchmark --preset=dsa_decode   # decode_step_table(131072)
    python -m experiments.benchmark --preset=dsa_fp8      # fp8_agreement_table(4096, 512)

`decode_step`: one new token against a cache of `cache_len` tokens (B = 1, 8 query heads,
head_dim 64, one shared kv head as in DeepSeek's MQA mode; indexer 4 heads x 32 dims,
top_k 2048), through the public API: the dense step is `attention.flash_attention` over the
whole cache, the DSA step `attention.dsa_attention` with the cached indexer keys (float8 +
block scales, `fp8.Quantized`, as the DSA layer's decode cache holds them; or float32).
Ratios are paired (`benchmark.paired_ratio`: side by side, median over rounds), with the bytes
each step must read, since a decode step is bandwidth-bound.

`fp8_agreement`: the share of the float32 top-k set (causal, T queries and keys) that the FP8
indexer also selects, on Gaussian q_I / k_I and on inputs whose first few channels are 100x
larger (as trained activations have), for per-vector scales, 128-blocks, 128-blocks after the
Hadamard rotation, and the same with power-of-two scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import attention
from attention import Mask, fp8
from attention.indexer import topk_overlap
from experiments.bench.timing import median_seconds, paired_ratio


def _decode_inputs(cache_len, heads, kv_heads, head_dim, index_heads, index_dim, seed=0):
  keys = jax.random.split(jax.random.key(seed), 6)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32)
  return dict(q=normal(keys[0], (1, 1, heads, head_dim)),
              k=normal(keys[1], (1, cache_len, kv_heads, head_dim)),
              v=normal(keys[2], (1, cache_len, kv_heads, head_dim)),
              index_q=normal(keys[3], (1, 1, index_heads, index_dim)),
              index_k=normal(keys[4], (1, cache_len, index_dim)),
              index_w=normal(keys[5], (1, 1, index_heads)) * index_heads ** -0.5)


def decode_step(cache_len: int = 131072, *, heads: int = 8, kv_heads: int = 1,
                head_dim: int = 64, index_heads: int = 4, index_dim: int = 32,
                top_k: int = 2048, rounds: int = 5) -> dict:
  """Medians (ms) of the dense and DSA decode steps and their paired ratios (module doc)."""
  x = _decode_inputs(cache_len, heads, kv_heads, head_dim, index_heads, index_dim)
  mask = Mask(causal=True, q_offset=cache_len - 1)  # the new token is the cache's last
  fmt = fp8.Fp8Format(min(index_dim, fp8.DEFAULT_BLOCK))
  keys8 = jax.jit(lambda k: fp8.quantize(k, fmt))(x["index_k"])

  dense = jax.jit(lambda q, k, v: attention.flash_attention(q, k, v, mask=mask))

  def dsa_step(fmt_):
    return jax.jit(lambda q, k, v, iq, ik, iw: attention.dsa_attention(
        q, k, v, mask=mask, index_q=iq, index_k=ik, index_w=iw, top_k=top_k, fp8=fmt_))

  qkv = (x["q"], x["k"], x["v"])
  args8 = (*qkv, x["index_q"], keys8, x["index_w"])
  args32 = (*qkv, x["index_q"], x["index_k"], x["index_w"])
  dsa8, dsa32 = dsa_step(fmt), dsa_step(False)
  kv_bytes = 2 * cache_len * kv_heads * head_dim * 4
  index_bytes = {"fp8": keys8.values.nbytes + keys8.scale.nbytes, "f32": x["index_k"].nbytes}
  gathered = 2 * top_k * kv_heads * head_dim * 4
  stream = jax.jit(lambda k, v: jnp.sum(k) + jnp.sum(v))  # what reading K and V alone costs
  return dict(
      cache_len=cache_len,
      stream_ms=1e3 * median_seconds(stream, (x["k"], x["v"]), 9),
      dense_ms=1e3 * median_seconds(dense, qkv, 9),
      dsa_fp8_ms=1e3 * median_seconds(dsa8, args8, 9),
      dsa_f32_ms=1e3 * median_seconds(dsa32, args32, 9),
      ratio_fp8=paired_ratio(dsa8, dense, args8, qkv, rounds=rounds, calls=5),
      ratio_f32=paired_ratio(dsa32, dense, args32, qkv, rounds=rounds, calls=5),
      fp8_vs_f32_keys=paired_ratio(dsa8, dsa32, args8, args32, rounds=rounds, calls=5),
      dense_mib=kv_bytes / 2**20, dsa_fp8_mib=(index_bytes["fp8"] + gathered) / 2**20,
      dsa_f32_mib=(index_bytes["f32"] + gathered) / 2**20)


def decode_step_table(cache_len: int = 131072, **options) -> str:
  r = decode_step(cache_len, **options)
  gbs = lambda mib, ms: mib / 1024 / (ms / 1e3)
  return "\n".join([
      f"decode, one token vs a {r['cache_len']}-token cache (medians; ratios paired):",
      f"  jnp.sum over K and V {r['stream_ms']:7.2f} ms  reads {r['dense_mib']:6.1f} MiB "
      f"({gbs(r['dense_mib'], r['stream_ms']):.1f} GiB/s: this machine's streaming read)",
      f"  dense (flash) step   {r['dense_ms']:7.2f} ms  reads {r['dense_mib']:6.1f} MiB "
      f"({gbs(r['dense_mib'], r['dense_ms']):.1f} GiB/s)",
      f"  DSA, FP8 index keys  {r['dsa_fp8_ms']:7.2f} ms  reads {r['dsa_fp8_mib']:6.1f} MiB "
      f"({gbs(r['dsa_fp8_mib'], r['dsa_fp8_ms']):.1f} GiB/s)  dense / DSA = "
      f"{r['ratio_fp8']:.1f}x",
      f"  DSA, f32 index keys  {r['dsa_f32_ms']:7.2f} ms  reads {r['dsa_f32_mib']:6.1f} MiB "
      f"({gbs(r['dsa_f32_mib'], r['dsa_f32_ms']):.1f} GiB/s)  dense / DSA = "
      f"{r['ratio_f32']:.1f}x",
      f"  f32-key step / FP8-key step: {r['fp8_vs_f32_keys']:.2f}x"])


FORMATS = {
    "per-vector scale": (None, False),  # one scale per index_dim values
    "128-blocks": (fp8.Fp8Format(block=fp8.DEFAULT_BLOCK), False),
    "128-blocks + Hadamard": (fp8.Fp8Format(block=fp8.DEFAULT_BLOCK), True),
    "128-blocks + Hadamard, pow2": (fp8.Fp8Format(block=fp8.DEFAULT_BLOCK, pow2=True), True),
}


def indexer_inputs(length: int, index_heads: int, index_dim: int, outliers: int = 0,
                   seed: int = 0):
  """Gaussian `(q_I, k_I, w)`; `outliers` channels (the same in q and k) 100x larger."""
  keys = jax.random.split(jax.random.key(seed), 3)
  gain = jnp.ones((index_dim,)).at[:outliers].set(100.0)
  q = jax.random.normal(keys[0], (1, length, index_heads, index_dim)) * gain
  k = jax.random.normal(keys[1], (1, length, index_dim)) * gain
  w = jnp.abs(jax.random.normal(keys[2], (1, length, index_heads))) * index_heads ** -0.5
  return q, k, w


def fp8_agreement(length: int = 4096, top_k: int = 512, *, index_heads: int = 4,
                  index_dim: int = 256, outliers: int = 4) -> dict:
  """`{(inputs, format): overlap}`; per-vector = one scale per `index_dim` values."""
  out = {}
  for name, n_out in (("Gaussian", 0), (f"{outliers} channels x100", outliers)):
    q, k, w = indexer_inputs(length, index_heads, index_dim, n_out)
    for label, (fmt, rotate) in FORMATS.items():
      fmt = fmt or fp8.Fp8Format(block=index_dim)
      fn = jax.jit(lambda q, k, w, fmt=fmt, rotate=rotate: topk_overlap(
          q, k, w, top_k=top_k, mask=Mask(causal=True), fp8=fmt, rotate=rotate))
      out[(name, label)] = float(fn(q, k, w))
  return out


def fp8_agreement_table(length: int = 4096, top_k: int = 512, **options) -> str:
  result = fp8_agreement(length, top_k, **options)
  inputs = list(dict.fromkeys(name for name, _ in result))
  lines = [f"FP8 top-{top_k} overlap with float32 (T = {length}, causal):",
           "| scales | " + " | ".join(inputs) + " |", "|---|" + "---|" * len(inputs)]
  for label in FORMATS:
    lines.append(f"| {label} | " + " | ".join(f"{result[(i, label)]:.3f}" for i in inputs)
                 + " |")
  return "\n".join(lines)
