r"""GPU check of DeepSeek Sparse Attention: Pallas sparse kernels, then DSA vs causal flash.

    python -m experiments.dsa_gpu_check                  # < 6 minutes on an H100/H200
    python -m experiments.dsa_gpu_check --interpret --lengths=256 --top_k=32 --check_len=64
                                                         # CPU smoke test of this script

1. Correctness on the GPU: `sparse_attention(implementation="pallas")` (the Triton forward and
   backward kernels) vs the XLA path on the same inputs, in the same dtype and in float32:
   forward and gradients (q, k, v) for shared `[B, T, k]` and per-kv-head `[B, T, K, k]`
   indices, -1 slots, GQA and MQA, causal; bf16 and float32. PASS/FAIL against the DESIGN.md
   tolerances (relative to each output's magnitude, gradients 2x).
2. Speed in bf16 (B=1, 8 query heads, 1 kv head, head_dim 64, indexer 4 heads x 32 dims,
   top_k 2048) at 32K and 128K tokens: causal flash (Pallas), the indexer's top-k selection,
   sparse attention given those indices, the whole DSA forward (selection + sparse
   attention), and forward+backward of flash and of sparse attention. Then the speed-ups.

Every measurement is guarded (an error is printed and the run goes on); a time budget skips
what is left, least important last. No ml_collections needed (runs on a bare JAX install).
"""

from __future__ import annotations

import functools
import time
import traceback

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import attention
from attention import Mask, flash_attention
from attention import indexer as indexer_lib
from attention import sparse as sparse_lib
from experiments import timing

_START = time.time()
FLAGS = flags.FLAGS
flags.DEFINE_float("budget_s", 330.0, "No measurement starts after budget_s - 30 seconds.")
flags.DEFINE_list("lengths", ["32768", "131072"], "Sequence lengths to time.")
flags.DEFINE_integer("top_k", 2048, "Keys per query (DeepSeek-V3.2: 2048).")
flags.DEFINE_integer("heads", 8, "Query heads.")
flags.DEFINE_integer("kv_heads", 1, "KV heads (1: MQA, as DSA's MLA runs in MQA mode).")
flags.DEFINE_integer("head_dim", 64, "Head dimension.")
flags.DEFINE_integer("index_heads", 4, "Indexer heads.")
flags.DEFINE_integer("index_dim", 32, "Indexer head dimension.")
flags.DEFINE_integer("check_len", 512, "Sequence length of the correctness cases.")
flags.DEFINE_bool("interpret", False, "Pallas interpret mode (a CPU smoke test of this script).")


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


def check_correctness() -> bool:
  print("== correctness: sparse_attention pallas vs xla (same dtype and float32) ==")
  t, top_k = FLAGS.check_len, max(8, FLAGS.check_len // 8)
  cases = [("shared idx, gqa 8:2, d64", 8, 2, 64, None),
           ("per-kv-head idx, gqa 8:2, d64", 8, 2, 64, 2),
           ("shared idx, mqa 8:1, d128", 8, 1, 128, None)]
  tol = {jnp.bfloat16: 2e-2, jnp.float32: 1e-5}
  all_ok = True
  for (name, n, kh, h, idx_heads), dtype in [(c, d) for c in cases
                                              for d in (jnp.bfloat16, jnp.float32)]:
    try:
      keys = jax.random.split(jax.random.key(0), 5)
      q, dout = _normal(keys[0], (2, t, n, h), dtype), _normal(keys[3], (2, t, n, h), dtype)
      k, v = _normal(keys[1], (2, t, kh, h), dtype), _normal(keys[2], (2, t, kh, h), dtype)
      idx = _random_indices(keys[4], 2, t, idx_heads, top_k)
      mask = Mask(causal=True)

      def run(impl, *xs):
        fn = functools.partial(sparse_lib.sparse_attention, indices=idx, mask=mask,
                               implementation=impl,
                               interpret=FLAGS.interpret and impl == "pallas")
        out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v), *xs[:3])
        return (out, *pullback(xs[3]))

      ours = jax.jit(functools.partial(run, "pallas"))(q, k, v, dout)
      same = jax.jit(functools.partial(run, "xla"))(q, k, v, dout)
      f32 = jax.jit(functools.partial(run, "xla"))(
          *(x.astype(jnp.float32) for x in (q, k, v, dout)))
      err = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
      errs = [err(a, b) for a, b in zip(ours, f32)]
      errs_same = [err(a, b) for a, b in zip(ours, same)]
      scale = [float(jnp.max(jnp.abs(b))) + 1.0 for b in f32]
      ok = all(e <= tol[dtype] * (2 if i else 1) * s for i, (e, s) in enumerate(zip(errs, scale)))
      ok = ok and all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in ours)
      all_ok &= ok
      fmt = lambda es: " ".join(f"{e:.1e}" for e in es)
      print(f"  {'PASS' if ok else 'FAIL'} {name:32s} {jnp.dtype(dtype).name:8s} max|err| "
            f"(out dq dk dv) vs f32 xla: {fmt(errs)}  vs same-dtype xla: {fmt(errs_same)}",
            flush=True)
    except Exception as e:  # pylint: disable=broad-except
      all_ok = False
      print(f"  ERROR {name} {jnp.dtype(dtype).name}: {type(e).__name__}: {e}"[:600], flush=True)
  print(f"correctness: {'ALL PASS' if all_ok else 'FAILURES ABOVE'}\n")
  return all_ok


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


def _fns(impl: str):
  """name -> (fn(**inputs, indices) -> output, gradient?)."""
  mask = Mask(causal=True)
  opts = dict(implementation=impl, interpret=FLAGS.interpret and impl == "pallas")
  select = lambda x: indexer_lib.indexer_topk(x["index_q"], x["index_k"], x["index_w"],
                                              top_k=FLAGS.top_k, mask=mask)
  flash = lambda x: flash_attention(x["q"], x["k"], x["v"], mask=mask, **opts)
  sparse = lambda x: sparse_lib.sparse_attention(x["q"], x["k"], x["v"], x["indices"],
                                                 mask=mask, **opts)
  dsa = lambda x: attention.dsa_attention(
      x["q"], x["k"], x["v"], mask=mask, index_q=x["index_q"], index_k=x["index_k"],
      index_w=x["index_w"], top_k=FLAGS.top_k, **opts)

  def grad(fn):
    def fwd_bwd(x):
      loss = lambda q, k, v: jnp.sum(fn(dict(x, q=q, k=k, v=v)).astype(jnp.float32))
      return jax.grad(loss, argnums=(0, 1, 2))(x["q"], x["k"], x["v"])
    return fwd_bwd

  return {"flash causal fwd": flash, "indexer top-k": select, "sparse attn fwd": sparse,
          "DSA fwd (top-k + sparse)": dsa, "flash causal fwd+bwd": grad(flash),
          "sparse attn fwd+bwd": grad(sparse)}


def run_timing(deadline: float) -> dict:
  print(f"== speed (bf16, B=1, {FLAGS.heads} heads / {FLAGS.kv_heads} kv, d{FLAGS.head_dim}, "
        f"indexer {FLAGS.index_heads}x{FLAGS.index_dim}, top_k {FLAGS.top_k}, causal) ==")
  impl = "pallas"
  results = {}
  for t in [int(x) for x in FLAGS.lengths]:
    if time.time() > deadline:
      print(f"  {t}: skipped (budget)")
      continue
    x = _inputs(t)
    try:
      x["indices"] = jax.block_until_ready(jax.jit(_fns(impl)["indexer top-k"])(x))
    except Exception as e:  # pylint: disable=broad-except
      print(f"  {t}: indexer top-k ERROR {type(e).__name__}: {str(e)[:300]}")
      continue
    for name, fn in _fns(impl).items():
      if time.time() > deadline:
        results[(t, name)] = "skipped (budget)"
        continue
      try:
        results[(t, name)] = timing.seconds_per_call(jax.jit(fn), x, samples=3)
        print(f"  {t:7d} {name:26s} {results[(t, name)] * 1e3:9.2f} ms", flush=True)
      except Exception as e:  # pylint: disable=broad-except
        results[(t, name)] = f"error: {type(e).__name__}"
        print(f"  {t:7d} {name:26s} ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
    del x
  return results


def report(results: dict) -> None:
  lengths = sorted({t for t, _ in results})
  names = list(dict.fromkeys(name for _, name in results))
  print("\n| tokens | " + " | ".join(names) + " |")
  print("|---|" + "---|" * len(names))
  for t in lengths:
    cells = [results.get((t, n), "") for n in names]
    print(f"| {t} | " + " | ".join(f"{c * 1e3:.2f} ms" if isinstance(c, float) else str(c)
                                   for c in cells) + " |")
  print()
  for t in lengths:
    get = lambda n: results.get((t, n))
    for label, fast, slow, goal in (
        ("sparse attn (given indices) vs causal flash, fwd", "sparse attn fwd",
         "flash causal fwd", 8),
        ("DSA fwd (top-k + sparse) vs causal flash, fwd", "DSA fwd (top-k + sparse)",
         "flash causal fwd", 1.5),
        ("sparse attn vs causal flash, fwd+bwd", "sparse attn fwd+bwd", "flash causal fwd+bwd",
         None)):
      if isinstance(get(fast), float) and isinstance(get(slow), float):
        ratio = get(slow) / get(fast)
        verdict = "" if goal is None else f" (CPU-issue goal >= {goal}x: " + (
            "met)" if ratio >= goal else "not met)")
        print(f"  {t}: {label}: {ratio:.2f}x faster{verdict}")


def main(argv):
  del argv
  print(f"jax {jax.__version__}, devices: {jax.devices()}")
  if jax.default_backend() != "gpu" and not FLAGS.interpret:
    print("WARNING: no GPU backend; the Pallas kernels need one (or --interpret).")
  try:
    check_correctness()
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
  report(run_timing(_START + FLAGS.budget_s - 30))
  print(f"\ntotal {time.time() - _START:.0f}s")


if __name__ == "__main__":
  app.run(main)
