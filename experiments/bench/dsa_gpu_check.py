r"""GPU check of DeepSeek Sparse Attention: Pallas sparse kernels, then DSA vs causal flash.

On a lent GPU (one command, ~4 minutes; rows land in $OUT as they are measured):

    PYTHONPATH=. python3 -u -m experiments.bench.dsa_gpu_check --budget_s=240 --out=$OUT 2>&1 \
        | tee $OUT/dsa_gpu_check.log

CPU smoke test of this script (interpret mode, tiny shapes):

    python -m experiments.bench.dsa_gpu_check --allow_cpu --interpret --budget_s=120 --lengths=128 \
        --top_k=16 --check_len=32 --heads=2

1. Correctness (table `dsa_gpu_check_correctness`): `sparse_attention(implementation=
   "pallas")` (the Triton forward and backward kernels) vs the XLA path on the same inputs in
   float32 under `jax.default_matmul_precision("highest")` (and, for information, in the same
   dtype): forward and gradients (q, k, v) for shared `[B, T, k]` and per-kv-head `[B, T, K, k]`
   indices, -1 slots, GQA and MQA (up to 16 q heads per kv head), causal, and decode steps (the
   last query alone, T = 1: the split-slot decode gather kernel); bf16 and float32.
   PASS/FAIL against the DESIGN.md tolerances relative to each output's magnitude (grads 2x).
2. Speed (table `dsa_gpu_check_speed`), bf16, B=1, 8 query heads, 1 kv head, head_dim 64,
   indexer 4 heads x 32 dims, top_k 2048, at 32K and 128K tokens; one row per (tokens, what):
   causal flash (Pallas); the indexer's blockwise exact top-k (`indexer_topk`, GPU block of
   `default_topk_block_q`) and the same selection by `lax.top_k` over full-width score blocks;
   sparse attention given the indices; the whole DSA forward (top-k + sparse); forward+backward
   of flash and of sparse attention; and decode steps (the last token against the whole cache):
   reading K and V once (`jnp.sum`, the bound), the flash decode step (split-K kernel + merge),
   the sparse decode step given the selection (split-slot gather kernel) and the DSA decode step
   (indexer over the FP8 indexer keys as the decode cache holds them, top-k, gather). Order: the
   forward and decode rows at every length first, then forward+backward, then `lax.top_k`
   (what a cut run loses least).
3. Ratios (table `dsa_gpu_check_ratios`): slow / fast time per length, with the CPU goals
   (flash / sparse given indices 8x, flash / whole DSA forward 1.5x; decode: flash step / DSA
   step >= 3x, flash step / reading K+V <= 2x).

Every measurement is guarded; nothing starts after `--budget_s - --margin_s` seconds, and what
did not run is written as "skipped (budget)". Exits 2 at once without a GPU (unless
--allow_cpu), 1 if a correctness case failed. Imports nothing beyond jax/numpy/absl/jaxtyping.
"""

from __future__ import annotations

import functools
import time

from absl import app, flags
import jax
import jax.numpy as jnp

import attention
from attention import Mask, flash_attention, fp8
from attention import indexer as indexer_lib
from attention import sparse as sparse_lib
from experiments.bench import gpu_run, timing

_START = time.time()
FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags, defined when run as a script (importing defines nothing)."""
  gpu_run.define_common_flags(check_share=0.35)
  flags.DEFINE_list("lengths", ["32768", "131072"], "Sequence lengths to time.")
  flags.DEFINE_integer("top_k", 2048, "Keys per query (DeepSeek-V3.2: 2048).")
  flags.DEFINE_integer("heads", 8, "Query heads.")
  flags.DEFINE_integer("kv_heads", 1, "KV heads (1: MQA, as DSA's MLA runs in MQA mode).")
  flags.DEFINE_integer("head_dim", 64, "Head dimension.")
  flags.DEFINE_integer("index_heads", 4, "Indexer heads.")
  flags.DEFINE_integer("index_dim", 32, "Indexer head dimension.")
  flags.DEFINE_integer("topk_block_q", 0, "Queries per top-k step (0: the backend default).")
  flags.DEFINE_integer("check_len", 512, "Sequence length of the correctness cases.")
  flags.DEFINE_integer("check_cases", 99, "Run at most this many correctness cases.")


TOL = {jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float32): 1e-5}


def _normal(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


# --- correctness ---------------------------------------------------------------------------------


def _random_indices(key, b, t, heads: int | None, top_k: int):
  """Causal random selections: distinct keys <= the query, -1 where a query has fewer keys."""
  shape = (b, t) + ((heads,) if heads else ()) + (t,)
  scores = jax.random.uniform(key, shape)
  pos = jnp.arange(t)
  visible = pos[None, :] <= pos[:, None]  # t x s
  visible = visible[None, :, None] if heads else visible[None]
  _, idx = jax.lax.top_k(jnp.where(visible, scores, -1.0), top_k)
  order = jnp.take_along_axis(jnp.broadcast_to(visible, shape), idx, axis=-1)
  return jnp.where(order, idx, -1).astype(jnp.int32)


CASES = [  # name, heads, kv heads, head_dim, per-kv-head indices (their count) or None, decode
    ("shared idx, mqa 8:1, d64", 8, 1, 64, None, False),
    ("decode T=1 shared idx mqa 8:1", 8, 1, 64, None, True),
    ("per-kv-head idx, gqa 8:2, d64", 8, 2, 64, 2, False),
    ("decode T=1 per-kv-head gqa 8:2", 8, 2, 64, 2, True),
    ("shared idx, mqa 16:1, d128", 16, 1, 128, None, False),
]


def _check_one(n, kh, h, idx_heads, decode, dtype) -> dict:
  """`decode`: only the last query (T = 1 at position t - 1: the split-slot decode kernel)."""
  t, top_k = FLAGS.check_len, max(8, FLAGS.check_len // 8)
  t_q, mask = (1, Mask(causal=True, q_offset=t - 1)) if decode else (t, Mask(causal=True))
  keys = jax.random.split(jax.random.key(0), 5)
  q, dout = _normal(keys[0], (2, t_q, n, h), dtype), _normal(keys[3], (2, t_q, n, h), dtype)
  k, v = _normal(keys[1], (2, t, kh, h), dtype), _normal(keys[2], (2, t, kh, h), dtype)
  idx = _random_indices(keys[4], 2, t, idx_heads, top_k)[:, t - t_q:]

  def run(impl, *xs):
    fn = functools.partial(sparse_lib.sparse_attention, indices=idx, mask=mask,
                           implementation=impl, interpret=FLAGS.interpret and impl == "pallas")
    out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v), *xs[:3])
    return (out, *pullback(xs[3]))

  ours = jax.jit(functools.partial(run, "pallas"))(q, k, v, dout)
  same = jax.jit(functools.partial(run, "xla"))(q, k, v, dout)
  with jax.default_matmul_precision("highest"):
    f32 = jax.jit(functools.partial(run, "xla"))(*(x.astype(jnp.float32) for x in (q, k, v, dout)))
  err = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
  errs = [err(a, b) for a, b in zip(ours, f32)]
  ok = gpu_run.verdict(ours, errs, f32, TOL[jnp.dtype(dtype)])
  return dict(status="PASS" if ok else "FAIL", err_f32=gpu_run.format_errors(errs),
              err_same=gpu_run.format_errors([err(a, b) for a, b in zip(ours, same)]))


def check_correctness(budget: gpu_run.Budget, out_dir: str) -> bool:
  table = gpu_run.Table(out_dir, "dsa_gpu_check_correctness",
                        ["case", "dtype", "status", "err_f32", "err_same", "s"],
                        [-30, -8, 6, -31, -31, 5],
                        "sparse pallas vs XLA path (max|err| of out dq dk dv)")
  runs = [(c, d) for c in CASES for d in (jnp.bfloat16, jnp.float32)]
  cases = [(dict(case=name, dtype=jnp.dtype(dtype).name), (n, kh, h, idx_heads, decode, dtype))
           for (name, n, kh, h, idx_heads, decode), dtype in runs[:FLAGS.check_cases]]
  return gpu_run.run_checks(table, cases, _check_one, budget, FLAGS.check_share, "err_f32")


# --- speed ---------------------------------------------------------------------------------------


def _inputs(t: int):
  b, n, kh, h = 1, FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim
  j, d = FLAGS.index_heads, FLAGS.index_dim
  keys = jax.random.split(jax.random.key(t), 6)
  bf16 = jnp.bfloat16
  return dict(q=_normal(keys[0], (b, t, n, h), bf16), k=_normal(keys[1], (b, t, kh, h), bf16),
              v=_normal(keys[2], (b, t, kh, h), bf16),
              index_q=_normal(keys[3], (b, t, j, d), bf16),
              index_k=_normal(keys[4], (b, t, d), bf16),
              index_w=_normal(keys[5], (b, t, j), bf16) * j ** -0.5)


def lax_topk_select(index_q, index_k, index_w, *, top_k: int, block_q: int):
  """The indexer's causal top-k by `lax.top_k` over full-width `[B, bq, S]` score blocks (the
  baseline `indexer_topk` is compared with). -1 where a query sees fewer than top_k keys."""
  b, t, _, _ = index_q.shape
  s = index_k.shape[1]
  bq = min(block_q, t)
  assert t % bq == 0, (t, bq)

  def block(i):
    q_i = jax.lax.dynamic_slice_in_dim(index_q, i * bq, bq, axis=1)
    w_i = jax.lax.dynamic_slice_in_dim(index_w, i * bq, bq, axis=1)
    scores = indexer_lib.indexer_scores(q_i, index_k, w_i,
                                        mask=Mask(causal=True, q_offset=i * bq))  # B bq S
    values, idx = jax.lax.top_k(scores, min(top_k, s))
    return jnp.where(values > -jnp.inf, idx, -1).astype(jnp.int32)

  out = jax.lax.map(block, jnp.arange(t // bq))  # nq B bq k
  return out.transpose(1, 0, 2, 3).reshape(b, t, -1)


def _fns(block_q: int):
  """name -> fn(inputs with "indices") -> output (timed one by one, in this order)."""
  mask = Mask(causal=True)
  opts = dict(implementation="pallas", interpret=FLAGS.interpret)
  flash = lambda x: flash_attention(x["q"], x["k"], x["v"], mask=mask, **opts)
  sparse = lambda x: sparse_lib.sparse_attention(x["q"], x["k"], x["v"], x["indices"],
                                                 mask=mask, **opts)
  dsa = lambda x: attention.dsa_attention(
      x["q"], x["k"], x["v"], mask=mask, index_q=x["index_q"], index_k=x["index_k"],
      index_w=x["index_w"], top_k=FLAGS.top_k, block_q=block_q, **opts)

  def grad(fn):
    def fwd_bwd(x):
      loss = lambda q, k, v: jnp.sum(fn(dict(x, q=q, k=k, v=v)).astype(jnp.float32))
      return jax.grad(loss, argnums=(0, 1, 2))(x["q"], x["k"], x["v"])
    return fwd_bwd

  return {"flash causal fwd": flash, "sparse attn fwd": sparse,
          "DSA fwd (top-k + sparse)": dsa,
          f"indexer top-k (bq {block_q})": functools.partial(_select, block_q=block_q),
          **_decode_fns(opts),
          "flash causal fwd+bwd": grad(flash), "sparse attn fwd+bwd": grad(sparse),
          f"lax.top_k select (bq {block_q})": lambda x: lax_topk_select(
              x["index_q"], x["index_k"], x["index_w"], top_k=FLAGS.top_k, block_q=block_q)}


def _decode_inputs(x: dict) -> dict:
  """The last token's q / indexer q / weights / selection (`*1`, T = 1 at position t - 1) and
  the indexer keys in FP8, as the DSA layer's decode cache holds them."""
  return dict(q1=x["q"][:, -1:], index_q1=x["index_q"][:, -1:], index_w1=x["index_w"][:, -1:],
              indices1=x["indices"][:, -1:], index_k8=jax.jit(fp8.quantize, static_argnums=1)(
                  x["index_k"], _fp8_format()))


def _fp8_format() -> fp8.Fp8Format:
  """One float32 scale per indexer key (block = d_I, at most DeepSeek's 128)."""
  return fp8.Fp8Format(min(fp8.DEFAULT_BLOCK, FLAGS.index_dim))


def _decode_fns(opts: dict) -> dict:
  """The decode rows: one token against the whole cache (`_decode_inputs`); reading K and V once
  (`jnp.sum`) is the bound of the flash step."""
  at_end = lambda x: Mask(causal=True, q_offset=x["k"].shape[1] - 1)
  f32 = jnp.float32
  return {
      "read K+V (jnp.sum)": lambda x: jnp.sum(x["k"], dtype=f32) + jnp.sum(x["v"], dtype=f32),
      "flash decode step": lambda x: flash_attention(x["q1"], x["k"], x["v"], mask=at_end(x),
                                                     **opts),
      "sparse decode step (given idx)": lambda x: sparse_lib.sparse_attention(
          x["q1"], x["k"], x["v"], x["indices1"], mask=at_end(x), **opts),
      "DSA decode step (FP8 keys)": lambda x: attention.dsa_attention(
          x["q1"], x["k"], x["v"], mask=at_end(x), index_q=x["index_q1"], index_k=x["index_k8"],
          index_w=x["index_w1"], top_k=FLAGS.top_k, fp8=_fp8_format(), **opts),
  }


def _select(x, block_q: int):
  return indexer_lib.indexer_topk(x["index_q"], x["index_k"], x["index_w"], top_k=FLAGS.top_k,
                                  mask=Mask(causal=True), block_q=block_q)


def plan(lengths, names):
  """(tokens, name) in order of importance: the forward comparison and the decode steps at every
  length first (flash, sparse, DSA, the indexer's top-k; reading K+V, the flash, sparse and DSA
  decode steps), then forward+backward, then `lax.top_k`."""
  tiers = ([n for n in names if "fwd+bwd" not in n and "lax" not in n],
           [n for n in names if "fwd+bwd" in n], [n for n in names if "lax" in n])
  return [(t, name) for tier in tiers for t in lengths for name in tier]


def run_timing(budget: gpu_run.Budget, out_dir: str) -> dict:
  block_q = FLAGS.topk_block_q or indexer_lib.default_topk_block_q()
  table = gpu_run.Table(
      out_dir, "dsa_gpu_check_speed", ["tokens", "what", "ms", "status"], [7, -30, 10, -20],
      f"speed (bf16, B=1, {FLAGS.heads} heads / {FLAGS.kv_heads} kv, d{FLAGS.head_dim}, "
      f"indexer {FLAGS.index_heads}x{FLAGS.index_dim}, top_k {FLAGS.top_k}, causal)")
  fns, inputs, results, skipped = _fns(block_q), {}, {}, []
  for t, name in plan([int(x) for x in FLAGS.lengths], list(fns)):
    if not budget.allows():
      skipped.append(dict(tokens=t, what=name))
      continue
    try:
      if t not in inputs:  # inputs and the selection every sparse row runs on, once per length
        inputs[t] = _inputs(t)
        inputs[t]["indices"] = jax.block_until_ready(jax.jit(functools.partial(
            _select, block_q=block_q))(inputs[t]))
        inputs[t].update(_decode_inputs(inputs[t]))
      results[(t, name)] = timing.seconds_per_call(jax.jit(fns[name]), inputs[t], samples=3)
      table.add(tokens=t, what=name, ms=results[(t, name)] * 1e3, status="ok")
    except Exception as e:  # pylint: disable=broad-except
      table.add(tokens=t, what=name, status=f"ERROR {type(e).__name__}: {str(e)[:200]}")
  for row in skipped:
    table.add(**row, status="skipped (budget)")
  return results


RATIOS = (  # label, slow row, fast row, goal: ("min" | "max", value) or None
    ("sparse attn (given indices) vs flash, fwd", "flash causal fwd", "sparse attn fwd",
     ("min", 8)),
    ("DSA fwd (top-k + sparse) vs flash, fwd", "flash causal fwd", "DSA fwd (top-k + sparse)",
     ("min", 1.5)),
    ("sparse attn vs flash, fwd+bwd", "flash causal fwd+bwd", "sparse attn fwd+bwd", None),
    ("DSA decode step vs flash decode step", "flash decode step", "DSA decode step (FP8 keys)",
     ("min", 3)),
    ("flash decode step / reading K+V (x the bound)", "flash decode step", "read K+V (jnp.sum)",
     ("max", 2)),
)


def report(results: dict, out_dir: str) -> None:
  table = gpu_run.Table(out_dir, "dsa_gpu_check_ratios", ["tokens", "ratio", "speedup", "goal"],
                        [7, -48, 8, -12], "slow time / fast time (x faster)")
  for t in sorted({t for t, _ in results}):
    for label, slow, fast, goal in RATIOS:
      if (t, fast) in results and (t, slow) in results:
        ratio = results[(t, slow)] / results[(t, fast)]
        verdict = ""
        if goal is not None:
          met = ratio >= goal[1] if goal[0] == "min" else ratio <= goal[1]
          verdict = f"{'>=' if goal[0] == 'min' else '<='} {goal[1]}: " + (
              "met" if met else "not met")
        table.add(tokens=t, ratio=label, speedup=ratio, goal=verdict)


def main(argv):
  del argv
  budget = gpu_run.begin(_START, FLAGS)
  ok = check_correctness(budget, FLAGS.out)
  report(run_timing(budget, FLAGS.out), FLAGS.out)
  gpu_run.finish(ok, budget)


if __name__ == "__main__":
  define_flags()
  app.run(main)
