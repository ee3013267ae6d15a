r"""GPU check of the Pallas flash attention kernels: correctness, then TFLOP/s side by side.

    python -m experiments.gpu_check                 # ~5 minutes on an H100/H200
    python -m experiments.gpu_check --budget_s=120  # stop earlier (most important first)
    python -m experiments.gpu_check --sweep         # also try a few tile shapes (tuning)
    python -m experiments.gpu_check --interpret --skip_check --lengths=64 --head_dims=32 \
        --window=32 --tokens=64 --width=64            # CPU smoke test of this script

1. Correctness on the GPU: the Pallas kernels vs the XLA path (same dtype) and vs the dense
   float32 reference, forward and gradients, over causal / window / segments / GQA / odd
   lengths / q_offset. Prints max errors and PASS/FAIL against the DESIGN.md tolerances.
2. Speed, bf16, 4K / 16K / 64K tokens, head_dim 64 and 128, causal and a causal 4096-token
   window: forward and forward+backward TFLOP/s of ours ("pallas"), cuDNN
   (`jax.nn.dot_product_attention(implementation="cudnn")`), our XLA path, and JAX's bundled
   Pallas mha (causal only: it has no window). FLOPs count visible (query, key) pairs only:
   forward 4 * B * N * pairs * H, backward 2.5x that (the FlashAttention convention).
   Batch x length = 16K tokens (batch 1 at 16K and 64K), N * H = 2048.

Every measurement is guarded: a failure prints its error and the run goes on. Timings are the
median of repeats after a warm-up; a time budget (`--budget_s`) skips what is left, in order of
importance (the acceptance configurations come first). Ends with a markdown table for README.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import traceback

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from attention import BlockSizes, Mask, flash_attention, local_mask
from attention.reference import reference_attention
from experiments import timing

try:  # JAX's bundled (deprecated) Pallas GPU mha: causal/segments only, no window, no GQA.
  from jax.experimental.pallas.ops.gpu import attention as jax_mha  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover - removed in some future JAX
  jax_mha = None

_START = time.time()  # the budget counts from import (JAX start-up included)
FLAGS = flags.FLAGS
flags.DEFINE_float("budget_s", 310.0, "Seconds for the whole run: no measurement starts after "
                   "budget_s - 40 (the rest is skipped, least important last).")
flags.DEFINE_bool("sweep", False, "Also time a few tile shapes at 16K, head_dim 128, causal.")
flags.DEFINE_bool("skip_check", False, "Skip the correctness section.")
flags.DEFINE_integer("window", 4096, "Sliding window (tokens) of the windowed configurations.")
flags.DEFINE_list("lengths", ["4096", "16384", "65536"], "Sequence lengths to time.")
flags.DEFINE_list("head_dims", ["128", "64"], "Head dims to time.")
flags.DEFINE_integer("tokens", 16384, "Batch x length of each timed configuration.")
flags.DEFINE_integer("width", 2048, "Heads x head_dim of each timed configuration.")
flags.DEFINE_bool("interpret", False, "Pallas interpret mode (a CPU smoke test of this script).")


# --- correctness ---------------------------------------------------------------------------------


def _inputs(seed, b, t, s, n, kh, h, dtype):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (b, s, kh, h), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (b, s, kh, h), jnp.float32).astype(dtype)
  dout = jax.random.normal(keys[3], (b, t, n, h), jnp.float32).astype(dtype)
  return q, k, v, dout


def _value_and_grads(fn, q, k, v, dout):
  out, pullback = jax.vjp(fn, q, k, v)
  return (out, *pullback(dout))


def check_correctness():
  print("== correctness: pallas and XLA path (same dtype) vs the float32 reference ==")
  seg = jnp.asarray(np.repeat(np.arange(5), 200)[None].repeat(2, 0), jnp.int32)
  seg = seg.at[:, -37:].set(-1)
  cases = [
      ("causal d128", (2, 1000, 1000, 8, 8, 128), Mask(causal=True)),
      ("window 300 gqa 8:2 d64", (2, 1000, 1000, 8, 2, 64), local_mask(300)),
      ("segments+pad d128", (2, 1000, 1000, 4, 4, 128),
       Mask(causal=True, q_segment_ids=seg, kv_segment_ids=seg)),
      ("q_offset [B] mqa d64", (2, 256, 1000, 8, 1, 64),
       Mask(causal=True, window=(511, 0), q_offset=jnp.array([744, 500]))),
      ("bidirectional window d256", (1, 700, 700, 4, 2, 256), Mask(window=(64, 64))),
  ]
  tol = {jnp.bfloat16: 2e-2, jnp.float16: 5e-3, jnp.float32: 1e-5}
  all_ok = True
  runs = [(c, jnp.bfloat16) for c in cases] + [(cases[0], jnp.float16), (cases[2], jnp.float32)]
  for (name, shape, mask), dtype in runs:
    try:
      q, k, v, dout = _inputs(0, *shape, dtype)
      run = lambda impl, q=q, k=k, v=v, dout=dout, mask=mask: jax.jit(functools.partial(
          _value_and_grads, functools.partial(flash_attention, mask=mask, implementation=impl,
                                              interpret=FLAGS.interpret and impl == "pallas"))
      )(q, k, v, dout)
      ours, xla = run("pallas"), run("xla")
      f32 = [x.astype(jnp.float32) for x in (q, k, v, dout)]
      with jax.default_matmul_precision("highest"):
        ref = jax.jit(functools.partial(_value_and_grads, functools.partial(
            reference_attention, mask=mask)))(*f32)
      err = lambda xs: [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
                        for a, b in zip(xs, ref)]
      errs, errs_xla = err(ours), err(xla)
      scale = [float(jnp.max(jnp.abs(b))) + 1.0 for b in ref]
      # Relative to each output's magnitude (long rows accumulate); gradients get 2x.
      ok = all(e <= tol[dtype] * (2 if i else 1) * s
               for i, (e, s) in enumerate(zip(errs, scale)))
      ok = ok and all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in ours)
      all_ok &= ok
      fmt = lambda es: " ".join(f"{e:.1e}" for e in es)
      print(f"  {'PASS' if ok else 'FAIL'} {name:28s} {jnp.dtype(dtype).name:8s} max|err| vs f32 "
            f"ref (out dq dk dv): pallas {fmt(errs)}  xla {fmt(errs_xla)}")
    except Exception as e:  # pylint: disable=broad-except
      all_ok = False
      print(f"  ERROR {name} {jnp.dtype(dtype).name}: {type(e).__name__}: {e}"[:600])
  print(f"correctness: {'ALL PASS' if all_ok else 'FAILURES ABOVE'}\n")


# --- timing --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
  length: int
  head_dim: int
  window: int | None  # None: causal full attention

  @property
  def batch(self):
    return max(1, FLAGS.tokens // self.length)

  @property
  def heads(self):
    return max(1, FLAGS.width // self.head_dim)

  def pairs(self) -> int:
    """Visible (query, key) pairs of one head: causal, or causal within the window."""
    t, w = self.length, self.window or self.length
    return w * t - w * (w - 1) // 2

  def fwd_flops(self) -> float:
    return 4.0 * self.batch * self.heads * self.pairs() * self.head_dim

  def name(self):
    kind = "causal" if self.window is None else f"win{self.window}"
    length = f"{self.length // 1024}K" if self.length >= 1024 else str(self.length)
    return f"{length} d{self.head_dim} {kind}"


def _implementations(cfg: Config):
  """name -> attention fn(q, k, v) on [B, T, N, H] bf16, or a string saying why it is n/a."""
  mask = Mask(causal=True) if cfg.window is None else local_mask(cfg.window)
  impls = {
      "pallas": functools.partial(flash_attention, mask=mask, implementation="pallas",
                                  interpret=FLAGS.interpret),
      "cudnn": functools.partial(
          jax.nn.dot_product_attention, is_causal=True, implementation="cudnn",
          local_window_size=None if cfg.window is None else (cfg.window - 1, 0)),
      "xla": functools.partial(flash_attention, mask=mask, implementation="xla"),
  }
  if cfg.window is not None or jax_mha is None:
    impls["jax_pallas_mha"] = "n/a (no window)" if jax_mha else "n/a (not in this JAX)"
  else:
    blocks = jax_mha.BlockSizes(block_q=128, block_k=64, block_q_dkv=32, block_kv_dkv=32,
                                block_q_dq=32, block_kv_dq=32)
    impls["jax_pallas_mha"] = lambda q, k, v: jax_mha.mha(
        q, k, v, None, sm_scale=cfg.head_dim ** -0.5, causal=True, block_sizes=blocks)
  return impls


def _measure(impl, cfg: Config, mode: str):
  q, k, v, _ = _inputs(1, cfg.batch, cfg.length, cfg.length, cfg.heads, cfg.heads, cfg.head_dim,
                       jnp.bfloat16)
  if mode == "fwd":
    fn = jax.jit(impl)
  else:
    loss = lambda q, k, v: jnp.sum(impl(q, k, v).astype(jnp.float32))
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  seconds = timing.seconds_per_call(fn, q, k, v)
  flops = cfg.fwd_flops() * (1.0 if mode == "fwd" else 3.5)
  return seconds, flops / seconds / 1e12


def _plan(lengths, head_dims, window: int):
  """(config, mode, impl) in order of importance: acceptance configurations, ours and cuDNN
  first; JAX's Pallas mha and our XLA path last."""
  first = [Config(16384, 128, None), Config(65536, 128, None), Config(65536, 128, window)]
  configs = [Config(t, h, w) for t in lengths for h in head_dims for w in (None, window)
             if not (w and w >= t)]
  configs.sort(key=lambda c: first.index(c) if c in first else len(first))
  return [(cfg, mode, impl)
          for impls in (("pallas", "cudnn"), ("jax_pallas_mha", "xla"))
          for cfg in configs for mode in ("fwd", "fwd+bwd") for impl in impls]


def run_timing(deadline: float, lengths, head_dims, window: int):
  """Times the plan until `deadline` (a `time.time()`); returns {(cfg, mode, impl): result}."""
  print("== speed (bf16, TFLOP/s of visible (query, key) pairs) ==")
  results = {}
  impls_cache = {}
  for cfg, mode, impl_name in _plan(lengths, head_dims, window):
    key = (cfg, mode, impl_name)
    if time.time() > deadline:
      results[key] = "skipped (budget)"
      continue
    if cfg not in impls_cache:
      impls_cache[cfg] = _implementations(cfg)
    impl = impls_cache[cfg][impl_name]
    if isinstance(impl, str):
      results[key] = impl
      continue
    try:
      seconds, tflops = _measure(impl, cfg, mode)
      results[key] = (seconds, tflops)
      print(f"  {cfg.name():20s} {mode:8s} {impl_name:15s} {seconds * 1e3:9.2f} ms "
            f"{tflops:7.1f} TFLOP/s", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      results[key] = f"error: {type(e).__name__}"
      print(f"  {cfg.name():20s} {mode:8s} {impl_name:15s} ERROR {type(e).__name__}: "
            f"{str(e)[:300]}", flush=True)
  return results


def report(results, window: int):
  def get(cfg, mode, impl):
    r = results.get((cfg, mode, impl))
    return r if isinstance(r, tuple) else None

  print("\n== acceptance ==")
  c16 = Config(16384, 128, None)
  for mode, goal in (("fwd", 0.6), ("fwd+bwd", 0.5)):
    ours, cudnn = get(c16, mode, "pallas"), get(c16, mode, "cudnn")
    if ours and cudnn:
      ratio = ours[1] / cudnn[1]
      print(f"  16K d128 causal {mode}: pallas/cudnn = {ratio:.2f} (goal >= {goal}) "
            f"{'OK' if ratio >= goal else 'BELOW'}")
  for mode in ("fwd", "fwd+bwd"):
    causal, win = get(Config(65536, 128, None), mode, "pallas"), get(
        Config(65536, 128, window), mode, "pallas")
    if causal and win:
      speedup = causal[0] / win[0]
      print(f"  64K d128 {mode}: window {window} is {speedup:.1f}x faster than causal (goal >= 8) "
            f"{'OK' if speedup >= 8 else 'BELOW'}")

  impls = ("pallas", "cudnn", "jax_pallas_mha", "xla")
  print("\n| config | mode | " + " | ".join(impls) + " |")
  print("|---|---|" + "---|" * len(impls))
  configs = sorted({cfg for cfg, _, _ in results}, key=lambda c: (c.length, -c.head_dim,
                                                                  c.window or 0))
  for cfg in configs:
    for mode in ("fwd", "fwd+bwd"):
      cells = []
      for impl in impls:
        r = results.get((cfg, mode, impl), "")
        cells.append(f"{r[1]:.0f} ({r[0] * 1e3:.1f} ms)" if isinstance(r, tuple) else str(r))
      print(f"| {cfg.name()} | {mode} | " + " | ".join(cells) + " |")


def run_sweep():
  """Tile shapes around the defaults: 16K d128 causal, and 64K d128 window (edge-tile waste)."""
  print("\n== tile sweep (pallas, bf16, d128) ==")
  base = BlockSizes.default_pallas(128, jnp.bfloat16)
  fwd_variants = [dict(), dict(block_q=128, block_kv=128), dict(block_q=64, block_kv=64),
                  dict(block_q=64, block_kv=32), dict(num_stages=2), dict(num_warps=4)]
  bwd_variants = [dict(), dict(block_kv_bwd=64, block_q_bwd=64, block_q_dq=64, block_kv_dq=64),
                  dict(block_q_bwd=64), dict(block_kv_dq=64), dict(num_warps=4)]
  plan = [(Config(16384, 128, None), "fwd", kw) for kw in fwd_variants]
  plan += [(Config(16384, 128, None), "fwd+bwd", kw) for kw in bwd_variants]
  plan += [(Config(65536, 128, FLAGS.window), "fwd", kw) for kw in fwd_variants[:4]]
  for cfg, mode, kw in plan:
    sizes = dataclasses.replace(base, **kw)
    mask = Mask(causal=True) if cfg.window is None else local_mask(cfg.window)
    impl = functools.partial(flash_attention, mask=mask, implementation="pallas",
                             block_sizes=sizes)
    try:
      seconds, tflops = _measure(impl, cfg, mode)
      print(f"  {cfg.name():18s} {mode:8s} {seconds * 1e3:8.2f} ms {tflops:7.1f} TFLOP/s  {kw}",
            flush=True)
    except Exception as e:  # pylint: disable=broad-except
      print(f"  {cfg.name():18s} {mode:8s} ERROR {type(e).__name__}: {str(e)[:200]}  {kw}",
            flush=True)


def main(argv):
  del argv
  print(f"jax {jax.__version__}, devices: {jax.devices()}")
  if jax.default_backend() != "gpu":
    print("WARNING: no GPU backend; the Pallas kernels need one (use the tests' interpret mode).")
  t0 = _START
  if not FLAGS.skip_check:
    try:
      check_correctness()
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
  results = run_timing(t0 + FLAGS.budget_s - 40, [int(t) for t in FLAGS.lengths],
                       [int(h) for h in FLAGS.head_dims], FLAGS.window)
  report(results, FLAGS.window)
  if FLAGS.sweep:
    run_sweep()
  print(f"\ntotal {time.time() - t0:.0f}s")


if __name__ == "__main__":
  app.run(main)
