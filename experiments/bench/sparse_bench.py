r"""Block-sparse attentions on the CPU: MoBA and NSA forward+backward vs causal flash.

    python -m experiments.benchmark --preset=sparse --repeats=3   # sparse_table((8192, 32768))
    python -m experiments.benchmark --preset=sparse --lengths=8192  # time 8192 only

B = 1, 8 query heads, head_dim 64, one shared kv head (DeepSeek's MQA mode, as the DSA
benchmark), float32, causal, at DSA's budget of 2048 selected keys per query:

* MoBA (`attention.moba_attention`): blocks of 64 keys, 31 gated + the own block = 2048 keys;
* NSA (the parameter-free part of `models.nsa`'s layer): compressed blocks of 32 keys every 16
  (each compressed to its mean here, standing in for the learned MLP), selection blocks of 64,
  top 32 = 2048 keys (the first and the two local blocks forced), a 512-key window, the three
  branch outputs averaged (fixed gates).

For each length: forward+backward (the gradient of a fixed random projection of the output
with respect to q, k and v) of flash, MoBA and NSA; the paired ratio flash / method (side by
side, median over rounds: `timing.paired_ratio`); and at `memory_len` the compiled temp memory
of each forward+backward (`memory_analysis`, exact).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import attention
from attention import Mask
from experiments.bench.timing import median_seconds, paired_ratio

HEADS, KV_HEADS, HEAD_DIM, BUDGET = 8, 1, 64, 2048
MOBA = dict(block_size=64, top_k_blocks=BUDGET // 64 - 1)
NSA = dict(block_len=32, stride=16, select_block=64, top_n=BUDGET // 64, initial_blocks=1,
           local_blocks=2)
NSA_WINDOW = 512


def nsa_attention(q, k, v, mask: Mask):
  """NSA's three branches with mean-pooled compression and equal fixed gates."""
  pool = lambda x: jnp.mean(attention.nsa_compression_windows(x, NSA["block_len"],
                                                              NSA["stride"]), axis=2)
  o_cmp, ids = attention.nsa_compressed_attention(q, pool(k), pool(v), kv_len=k.shape[1],
                                                  mask=mask, **NSA)
  o_slc = attention.block_sparse_attention(q, k, v, ids, block_size=NSA["select_block"],
                                           mask=mask)
  o_win = attention.flash_attention(
      q, k, v, mask=Mask(causal=True, window=attention.local_mask(NSA_WINDOW).window))
  return (o_cmp + o_slc + o_win) / 3


METHODS = {
    "flash": lambda q, k, v, mask: attention.flash_attention(q, k, v, mask=mask),
    "moba": lambda q, k, v, mask: attention.moba_attention(q, k, v, mask=mask, **MOBA),
    "nsa": nsa_attention,
}


def _inputs(length: int, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (1, length, HEADS, HEAD_DIM), jnp.float32)
  k = jax.random.normal(keys[1], (1, length, KV_HEADS, HEAD_DIM), jnp.float32)
  v = jax.random.normal(keys[2], (1, length, KV_HEADS, HEAD_DIM), jnp.float32)
  return q, k, v, jax.random.normal(keys[3], q.shape, jnp.float32)


def fwd_bwd(name: str):
  """jitted `(q, k, v, cotangent) -> (dq, dk, dv)` of method `name` under the causal mask."""
  fn = METHODS[name]
  loss = lambda q, k, v, w: jnp.sum(fn(q, k, v, Mask(causal=True)) * w)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def temp_mib(name: str, length: int) -> float:
  """Compiled temp memory (MiB) of method `name`'s forward+backward at `length` tokens."""
  args = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in _inputs(8)]
  args = [jax.ShapeDtypeStruct((1, length) + a.shape[2:], a.dtype) for a in args]
  compiled = fwd_bwd(name).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2 ** 20


def sparse_table(lengths=(8192, 32768), memory_len: int = 32768, rounds: int = 3) -> str:
  """Markdown table: per timed length and method, fwd+bwd seconds (median of 3 calls; 1 from
  32768 tokens), the paired ratio flash / method; then the temp memory at `memory_len`
  (compiled only, whether or not that length is timed)."""
  lines = ["| tokens | method | fwd+bwd s | flash / method (paired) |", "|---|---|---|---|"]
  for length in lengths:
    args = _inputs(length)
    flash = fwd_bwd("flash")
    for name in METHODS:
      compiled = fwd_bwd(name)
      seconds = median_seconds(compiled, args, 3 if length < 32768 else 1)
      ratio = 1.0 if name == "flash" else paired_ratio(compiled, flash, args, args,
                                                       rounds=rounds, calls=1)
      lines.append(f"| {length} | {name} | {seconds:.2f} | {ratio:.2f}x |")
      print(lines[-1], flush=True)
  memory = [f"| {memory_len} | {name} | fwd+bwd temp {temp_mib(name, memory_len):.0f} MiB | |"
            for name in METHODS]
  return "\n".join(lines + memory)
