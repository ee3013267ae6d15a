r"""GPU check of the Pallas flash attention kernels: correctness, then TFLOP/s side by side.

On a lent GPU (one command, ~4 minutes; rows land in $OUT as they are measured):

    PYTHONPATH=. python3 -u -m experiments.bench.gpu_check --budget_s=240 --out=$OUT 2>&1 \
        | tee $OUT/gpu_check.log

CPU smoke test of this script (interpret mode, tiny shapes):

    python -m experiments.bench.gpu_check --allow_cpu --interpret --budget_s=120 --check_len=64 \
        --check_cases=2 --lengths=64 --head_dims=32 --window=32 --tokens=64 --width=64 \
        --decode_lengths=64 --decode_batches=1

1. Correctness (table `gpu_check_correctness`): the Pallas kernels and the XLA path (same
   dtype) vs the dense float32 reference computed under `jax.default_matmul_precision
   ("highest")`, forward and gradients, over causal / window / segments / GQA / odd lengths /
   q_offset, decode steps (T = 1 and 4 against the whole cache: the split-K decode kernel and
   the XLA decode path; a ring cache's empty slots as segment ids, a window), sink tokens with
   learned sink logits, in bf16, f16 and
   float32 (the Pallas float32 dots are exact: `ieee`). One row per
   case: PASS/FAIL against the DESIGN.md tolerances relative to each output's magnitude
   (gradients 2x), the max errors of out, dq, dk, dv for pallas and for XLA. Only the first
   `--check_share` of the budget may start cases.
2. Decode (table `gpu_check_decode`), bf16, one token against a cache of `--decode_lengths`
   tokens at `--decode_batches`, 32 q heads / 8 kv heads, d128: reading the cache once
   (`jnp.sum` over K and V, the memory bound), the split-K flash-decoding kernel + merge
   ("pallas"), the XLA decode path and cuDNN: ms, GB/s of the K/V cache, time / read time.
3. Speed (table `gpu_check_speed`), bf16, 4K / 16K / 64K tokens, head_dim 128 and 64, causal and
   a causal 4096-token window: one row per (config, mode, implementation) with ms per call and
   TFLOP/s: ours ("pallas"), cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`),
   JAX's bundled Pallas mha (causal only) and our XLA path. FLOPs count visible (query, key)
   pairs only: forward 4 * B * N * pairs * H, backward 2.5x that. Batch x length = 16K tokens,
   N * H = 2048. The acceptance configurations come first.
4. Acceptance (table `gpu_check_acceptance`): pallas/cuDNN at 16K d128 causal (goals 0.6 fwd,
   0.5 fwd+bwd) and the 64K window-vs-causal speed-up (goal 8x).

Every measurement is guarded (its error becomes the row's status). Nothing starts after
`--budget_s - --margin_s` seconds from process start; what did not run is written as
"skipped (budget)". Exits 2 at once without a GPU (unless --allow_cpu), 1 if a check failed.
"""

from __future__ import annotations

import dataclasses
import functools
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from attention import BlockSizes, Mask, flash_attention, local_mask, visible_pairs
from attention.reference import reference_attention
from experiments.bench import gpu_run, timing

try:  # JAX's bundled Pallas GPU mha: causal/segments only, no window, no GQA.
  from jax.experimental.pallas.ops.gpu import attention as jax_mha  # pylint: disable=g-import-not-at-top,line-too-long
except ImportError:  # pragma: no cover - removed in some future JAX
  jax_mha = None

_START = time.time()  # the budget counts from here (after the imports: ~2 s of JAX start-up)
FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags, defined when run as a script (importing defines nothing)."""
  gpu_run.define_common_flags(check_share=0.4)
  flags.DEFINE_bool("sweep", False, "Also time a few tile shapes at 16K, head_dim 128, causal.")
  flags.DEFINE_bool("skip_check", False, "Skip the correctness section.")
  flags.DEFINE_integer("check_len", 1000, "Sequence length of the correctness cases.")
  flags.DEFINE_integer("check_cases", 99, "Run at most this many correctness cases.")
  flags.DEFINE_integer("window", 4096, "Sliding window (tokens) of the windowed configurations.")
  flags.DEFINE_list("lengths", ["4096", "16384", "65536"], "Sequence lengths to time.")
  flags.DEFINE_list("head_dims", ["128", "64"], "Head dims to time.")
  flags.DEFINE_integer("tokens", 16384, "Batch x length of each timed configuration.")
  flags.DEFINE_integer("width", 2048, "Heads x head_dim of each timed configuration.")
  flags.DEFINE_list("decode_lengths", ["131072"], "Cache lengths of the decode rows (none: '').")
  flags.DEFINE_list("decode_batches", ["1", "8"], "Batch sizes of the decode rows.")


TOL = {jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 5e-3,
       jnp.dtype(jnp.float32): 1e-5}


# --- correctness ---------------------------------------------------------------------------------


def _inputs(seed, b, t, s, n, kh, h, dtype):
  keys = jax.random.split(jax.random.key(seed), 4)
  return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key, shape in zip(
      keys, ((b, t, n, h), (b, s, kh, h), (b, s, kh, h), (b, t, n, h))))


def _value_and_grads(fn, q, k, v, dout):
  out, pullback = jax.vjp(fn, q, k, v)
  return (out, *pullback(dout))


def check_cases(length: int):
  """(name, (B, T, S, N, K, H), mask, dtype[, sink_logits]), most important first; lengths scale
  with `length`; a True fifth entry adds learned sink logits (fixed values, one per head)."""
  seg = jnp.asarray(np.minimum(np.arange(length) * 5 // length, 4)[None].repeat(2, 0), jnp.int32)
  seg = seg.at[:, -max(1, length // 27):].set(-1)
  t_dec, w = max(16, length // 4), max(8, length * 3 // 10)
  offsets = jnp.array([length - 4, length // 3])  # decode: 4 new tokens ending at the cache's end
  ring = jnp.where(jnp.arange(length)[None] < jnp.array([[length // 5], [0]]), -1, 0)  # empty first
  causal = ("causal d128", (2, length, length, 8, 8, 128), Mask(causal=True))
  segments = ("segments+pad d128", (2, length, length, 4, 4, 128),
              Mask(causal=True, q_segment_ids=seg, kv_segment_ids=seg))
  return [
      (*causal, jnp.bfloat16), (*segments, jnp.float32), (*causal, jnp.float32),
      ("window gqa 8:2 d64", (2, length, length, 8, 2, 64), local_mask(w), jnp.bfloat16),
      ("decode T=1 gqa 32:8 d128", (2, 1, length, 32, 8, 128),
       Mask(causal=True, q_offset=offsets + 3), jnp.bfloat16),
      ("decode T=4 ring+window mqa d64", (2, 4, length, 8, 1, 64),
       Mask(causal=True, window=(length // 4, 0), q_offset=offsets,
            q_segment_ids=jnp.zeros((2, 4), jnp.int32), kv_segment_ids=ring.astype(jnp.int32)),
       jnp.float32),
      (*segments, jnp.bfloat16),
      ("q_offset [B] mqa d64", (2, t_dec, length, 8, 1, 64),
       Mask(causal=True, window=(length // 2, 0),
            q_offset=jnp.array([length - t_dec, length // 2])), jnp.bfloat16),
      ("bidirectional window d256", (1, length * 7 // 10, length * 7 // 10, 4, 2, 256),
       Mask(window=(w // 4, w // 4)), jnp.bfloat16),
      (*causal, jnp.float16),
      # StreamingLLM sink tokens (the kernels visit the sink tile and the window band only) and
      # GPT-OSS sink logits (an extra softmax term, merged after the kernel), together.
      ("4 sinks+window+sink logits gqa", (2, length, length, 8, 2, 64),
       Mask(causal=True, window=(w // 2, 0), sinks=4), jnp.bfloat16, True),
  ]


def _check_one(name, shape, mask, dtype, sink_logits=False) -> dict:
  q, k, v, dout = _inputs(0, *shape, dtype)
  sinks = dict(sink_logits=jnp.linspace(-2.0, 3.0, shape[3])) if sink_logits else {}
  run = lambda impl: jax.jit(functools.partial(_value_and_grads, functools.partial(
      flash_attention, mask=mask, implementation=impl,
      interpret=FLAGS.interpret and impl == "pallas", **sinks)))(q, k, v, dout)
  ours, xla = run("pallas"), run("xla")
  with jax.default_matmul_precision("highest"):
    ref = jax.jit(functools.partial(_value_and_grads, functools.partial(
        reference_attention, mask=mask, **sinks)))(
            *(x.astype(jnp.float32) for x in (q, k, v, dout)))
  err = lambda xs: [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) for a, b in zip(xs, ref)]
  errs, errs_xla = err(ours), err(xla)
  ok = gpu_run.verdict(ours, errs, ref, TOL[jnp.dtype(dtype)])
  return dict(status="PASS" if ok else "FAIL", pallas_err=gpu_run.format_errors(errs),
              xla_err=gpu_run.format_errors(errs_xla))


def check_correctness(budget: gpu_run.Budget, out_dir: str) -> bool:
  table = gpu_run.Table(out_dir, "gpu_check_correctness",
                        ["case", "dtype", "status", "pallas_err", "xla_err", "s"],
                        [-26, -8, 6, -31, -31, 5],
                        "correctness vs the float32 reference (max|err| of out dq dk dv)")
  cases = [(dict(case=name, dtype=jnp.dtype(dtype).name), (name, shape, mask, dtype, *sinks))
           for name, shape, mask, dtype, *sinks
           in check_cases(FLAGS.check_len)[:FLAGS.check_cases]]
  return gpu_run.run_checks(table, cases, _check_one, budget, FLAGS.check_share, "pallas_err")


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

  def mask(self) -> Mask:
    return Mask(causal=True) if self.window is None else local_mask(self.window)

  def pairs(self) -> int:
    """Visible (query, key) pairs of one head: causal, or causal within the window."""
    return visible_pairs(self.mask(), self.length, self.length)

  def fwd_flops(self) -> float:
    return 4.0 * self.batch * self.heads * self.pairs() * self.head_dim

  def name(self):
    kind = "causal" if self.window is None else f"win{self.window}"
    length = f"{self.length // 1024}K" if self.length >= 1024 else str(self.length)
    return f"{length} d{self.head_dim} {kind}"


def _implementations(cfg: Config):
  """name -> attention fn(q, k, v) on [B, T, N, H] bf16, or a string saying why it is n/a."""
  mask = cfg.mask()
  impls = {
      "pallas": functools.partial(flash_attention, mask=mask, implementation="pallas",
                                  interpret=FLAGS.interpret),
      "cudnn": functools.partial(
          jax.nn.dot_product_attention, is_causal=True, implementation="cudnn",
          local_window_size=None if cfg.window is None else (cfg.window - 1, 0)),
      "xla": functools.partial(flash_attention, mask=mask, implementation="xla"),
  }
  if jax.default_backend() != "gpu":
    impls["cudnn"] = "n/a (no GPU)"
  if cfg.window is not None or jax_mha is None:
    impls["jax_pallas_mha"] = "n/a (no window)" if jax_mha else "n/a (not in this JAX)"
  else:
    b128, b64, b32 = (min(b, cfg.length) for b in (128, 64, 32))
    blocks = jax_mha.BlockSizes(block_q=b128, block_k=b64, block_q_dkv=b32, block_kv_dkv=b32,
                                block_q_dq=b32, block_kv_dq=b32)
    impls["jax_pallas_mha"] = lambda q, k, v: jax_mha.mha(
        q, k, v, None, sm_scale=cfg.head_dim ** -0.5, causal=True, block_sizes=blocks,
        interpret=FLAGS.interpret)
  return impls


def _measure(impl, cfg: Config, mode: str):
  q, k, v, _ = _inputs(1, cfg.batch, cfg.length, cfg.length, cfg.heads, cfg.heads, cfg.head_dim,
                       jnp.bfloat16)
  if mode == "fwd":
    fn = jax.jit(impl)
  else:
    loss = lambda q, k, v: jnp.sum(impl(q, k, v).astype(jnp.float32))
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  seconds = timing.seconds_per_call(fn, q, k, v, samples=1 if FLAGS.interpret else 5)
  flops = cfg.fwd_flops() * (1.0 if mode == "fwd" else 3.5)
  return seconds, flops / seconds / 1e12


def plan(lengths, head_dims, window: int):
  """(config, mode, impl) in order of importance: acceptance configurations, ours and cuDNN
  first; JAX's Pallas mha and our XLA path last."""
  first = [Config(16384, 128, None), Config(65536, 128, None), Config(65536, 128, window)]
  configs = [Config(t, h, w) for t in lengths for h in head_dims for w in (None, window)
             if not (w and w >= t)]
  configs.sort(key=lambda c: first.index(c) if c in first else len(first))
  return [(cfg, mode, impl)
          for impls in (("pallas", "cudnn"), ("jax_pallas_mha", "xla"))
          for cfg in configs for mode in ("fwd", "fwd+bwd") for impl in impls]


def run_timing(budget: gpu_run.Budget, out_dir: str, lengths, head_dims, window: int):
  """Times the plan while the budget allows; returns {(cfg, mode, impl): (s, TFLOP/s)}."""
  table = gpu_run.Table(out_dir, "gpu_check_speed",
                        ["config", "mode", "impl", "ms", "tflops", "status"],
                        [-18, -8, -15, 9, 7, -20], "speed (bf16, TFLOP/s of visible pairs)")
  results, impls_cache, skipped = {}, {}, []
  for cfg, mode, impl_name in plan(lengths, head_dims, window):
    row = dict(config=cfg.name(), mode=mode, impl=impl_name)
    if not budget.allows():
      skipped.append(row)
      continue
    if cfg not in impls_cache:
      impls_cache[cfg] = _implementations(cfg)
    impl = impls_cache[cfg][impl_name]
    if isinstance(impl, str):
      table.add(**row, status=impl)
      continue
    try:
      seconds, tflops = _measure(impl, cfg, mode)
      results[(cfg, mode, impl_name)] = (seconds, tflops)
      table.add(**row, ms=seconds * 1e3, tflops=tflops, status="ok")
    except Exception as e:  # pylint: disable=broad-except
      table.add(**row, status=f"ERROR {type(e).__name__}: {str(e)[:200]}")
  for row in skipped:
    table.add(**row, status="skipped (budget)")
  return results


def report(results, out_dir: str, window: int) -> None:
  table = gpu_run.Table(out_dir, "gpu_check_acceptance", ["figure", "value", "goal", "verdict"],
                        [-50, 7, 6, -8], "acceptance")
  c16 = Config(16384, 128, None)
  for mode, goal in (("fwd", 0.6), ("fwd+bwd", 0.5)):
    ours, cudnn = results.get((c16, mode, "pallas")), results.get((c16, mode, "cudnn"))
    value = ours[1] / cudnn[1] if ours and cudnn else None
    table.add(figure=f"16K d128 causal {mode}: pallas / cuDNN TFLOP/s", goal=f">={goal}",
              value=value if value else "n/a",
              verdict="n/a" if value is None else ("OK" if value >= goal else "BELOW"))
  for mode in ("fwd", "fwd+bwd"):
    causal = results.get((Config(65536, 128, None), mode, "pallas"))
    win = results.get((Config(65536, 128, window), mode, "pallas"))
    value = causal[0] / win[0] if causal and win else None
    table.add(figure=f"64K d128 {mode}: window {window} speed-up over causal", goal=">=8",
              value=value if value else "n/a",
              verdict="n/a" if value is None else ("OK" if value >= 8 else "BELOW"))


DECODE_SHAPE = (32, 8, 128)  # query heads, kv heads (GQA 4:1), head_dim of the decode rows


def _decode_impls(length: int):
  """name -> fn(q [B, 1, N, H], k, v) of one decode step at position `length - 1`."""
  mask = Mask(causal=True, q_offset=length - 1)
  f32 = jnp.float32
  impls = {
      "read K+V (jnp.sum)": lambda q, k, v: jnp.sum(k, dtype=f32) + jnp.sum(v, dtype=f32),
      "pallas (split-K)": functools.partial(flash_attention, mask=mask, implementation="pallas",
                                            interpret=FLAGS.interpret),
      "xla (decode path)": functools.partial(flash_attention, mask=mask, implementation="xla"),
      # the last token sees every key: no mask
      "cudnn": functools.partial(jax.nn.dot_product_attention, implementation="cudnn"),
  }
  if jax.default_backend() != "gpu":
    impls["cudnn"] = "n/a (no GPU)"
  return impls


def run_decode(budget: gpu_run.Budget, out_dir: str, lengths, batches) -> None:
  """One bf16 decode step (T = 1, `DECODE_SHAPE`) per (cache length, batch): the split-K
  kernel + merge, the XLA decode path and cuDNN next to reading the cache once (`jnp.sum`).
  GB/s = the K/V bytes (2 B S K H x 2) / time; `x read` = time / the read's time."""
  table = gpu_run.Table(out_dir, "gpu_check_decode",
                        ["config", "impl", "ms", "gbs", "x_read", "status"],
                        [-14, -20, 9, 7, 7, -20], "decode step (bf16, T=1, 32 q / 8 kv heads, "
                        "d128; GB/s of the K/V cache)")
  n, kh, h = DECODE_SHAPE
  for length in lengths:
    impls = _decode_impls(length)
    for b in batches:
      config, read_s, inputs = f"{length} B{b}", None, None
      for name, impl in impls.items():
        if not budget.allows():
          table.add(config=config, impl=name, status="skipped (budget)")
          continue
        if isinstance(impl, str):
          table.add(config=config, impl=name, status=impl)
          continue
        try:
          inputs = inputs or _inputs(2, b, 1, length, n, kh, h, jnp.bfloat16)[:3]
          seconds = timing.seconds_per_call(jax.jit(impl), *inputs,
                                            samples=1 if FLAGS.interpret else 5)
          read_s = seconds if name.startswith("read") else read_s
          table.add(config=config, impl=name, ms=seconds * 1e3, status="ok",
                    gbs=2 * b * length * kh * h * 2 / seconds / 1e9,
                    x_read=seconds / read_s if read_s else "")
        except Exception as e:  # pylint: disable=broad-except
          table.add(config=config, impl=name, status=f"ERROR {type(e).__name__}: {str(e)[:200]}")


def run_sweep(budget: gpu_run.Budget, out_dir: str):
  """Tile shapes around the defaults: 16K d128 causal, and 64K d128 window (edge-tile waste)."""
  table = gpu_run.Table(out_dir, "gpu_check_sweep", ["config", "mode", "ms", "tflops", "tiles"],
                        [-18, -8, 9, 7, -40], "tile sweep (pallas, bf16, d128)")
  base = BlockSizes.default_pallas(128, jnp.bfloat16)
  fwd = [dict(), dict(block_q=128, block_kv=128), dict(block_q=64, block_kv=64),
         dict(block_q=64, block_kv=32), dict(num_stages=2), dict(num_warps=4)]
  bwd = [dict(), dict(block_kv_bwd=64, block_q_bwd=64, block_q_dq=64, block_kv_dq=64),
         dict(block_q_bwd=64), dict(block_kv_dq=64), dict(num_warps=4)]
  runs = [(Config(16384, 128, None), "fwd", kw) for kw in fwd]
  runs += [(Config(16384, 128, None), "fwd+bwd", kw) for kw in bwd]
  runs += [(Config(65536, 128, FLAGS.window), "fwd", kw) for kw in fwd[:4]]
  for cfg, mode, kw in runs:
    if not budget.allows():
      table.add(config=cfg.name(), mode=mode, tiles=f"{kw} skipped (budget)")
      continue
    mask = cfg.mask()
    impl = functools.partial(flash_attention, mask=mask, implementation="pallas",
                             block_sizes=dataclasses.replace(base, **kw))
    try:
      seconds, tflops = _measure(impl, cfg, mode)
      table.add(config=cfg.name(), mode=mode, ms=seconds * 1e3, tflops=tflops, tiles=str(kw))
    except Exception as e:  # pylint: disable=broad-except
      table.add(config=cfg.name(), mode=mode, tiles=f"{kw} ERROR {type(e).__name__}")


def main(argv):
  del argv
  budget = gpu_run.begin(_START, FLAGS)
  ok = True
  if not FLAGS.skip_check:
    ok = check_correctness(budget, FLAGS.out)
  run_decode(budget, FLAGS.out, [int(t) for t in FLAGS.decode_lengths],
             [int(b) for b in FLAGS.decode_batches])
  results = run_timing(budget, FLAGS.out, [int(t) for t in FLAGS.lengths],
                       [int(h) for h in FLAGS.head_dims], FLAGS.window)
  report(results, FLAGS.out, FLAGS.window)
  if FLAGS.sweep:
    run_sweep(budget, FLAGS.out)
  gpu_run.finish(ok, budget)


if __name__ == "__main__":
  define_flags()
  app.run(main)
