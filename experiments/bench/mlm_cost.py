r"""Cost of the MLM encoder's layer patterns: compiled memory and training tokens per second.

    python -m experiments.bench.mlm_cost --lengths=256,1024,4096 --timed_lengths=256,1024

For each pattern of experiments/configs/mlm.py (alternating, global, local) and length T
(batch `--tokens // T` rows, so every length holds the same tokens):

* `attn_mib`: compiled temp memory (`jax.jit(...).lower(...).compile().memory_analysis()`) of
  the model's attention layers alone, forward + backward: every layer's attention function on
  the same `[B, T, N, H]` q/k/v with its mask (bidirectional; window for local kinds), one
  after the other. XLA reuses buffers between them, so this is a peak, set by the most
  expensive layer kind present (not a sum over layers);
* `step_mib`: the same for the whole model's loss + gradient (what a training step holds);
* `tokens_per_s` (timed lengths only): B * T / seconds per loss + gradient call, the patterns
  timed side by side in alternating rounds (median), so a shared machine's drift stays out of
  their ratio.

Prints a Markdown table and writes `mlm_cost.csv` under `--outdir`.
"""

from __future__ import annotations

import csv
import os
import statistics

from absl import app, flags
from flax import nnx
import jax
import jax.numpy as jnp

from experiments.bench import timing
from experiments.training import cli, trainer
from experiments.configs import mlm

FLAGS = flags.FLAGS


def attention_fn(model):
  """`f(q, k, v, segment_ids) -> sum of every layer's attention output` (fwd + bwd target)."""
  layers = [block.attn for block in model.blocks]

  def fn(q, k, v, segment_ids):
    return sum(jnp.sum(layer.attend(q, k, v, layer.mask(segment_ids, segment_ids)))
               for layer in layers)
  return fn


def step_fn(model):
  """`f(state, batch) -> (loss, grads)`: the model's loss and gradient, as a pure function."""
  graphdef, state = nnx.split(model)

  def loss(state, batch):
    return trainer.loss_fn(nnx.merge(graphdef, state), batch)[0]
  return jax.value_and_grad(loss), state


def mib(compiled) -> float:
  return compiled.memory_analysis().temp_size_in_bytes / 2**20


def measure(pattern: str, length: int, tokens: int, seed: int = 0):
  """(attention MiB, step MiB, compiled step, its args) of one pattern at one length."""
  config = mlm.get_config(pattern)
  config.task.seq_len = length
  model = trainer.make_model(config)
  b, c = max(tokens // length, 1), model.config
  shape = (b, length, c.num_heads, c.head_dim)
  q, k, v = (jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(seed), 3))
  segments = jnp.zeros((b, length), jnp.int32)
  attn = jax.jit(jax.grad(attention_fn(model), argnums=(0, 1, 2))).lower(
      q, k, v, segments).compile()
  step, state = step_fn(model)
  batch = dict(tokens=jnp.zeros((b, length), jnp.int32), targets=jnp.zeros((b, length), jnp.int32),
               loss_mask=jnp.ones((b, length), jnp.float32), segment_ids=segments)
  compiled = jax.jit(step).lower(state, batch).compile()
  return mib(attn), mib(compiled), compiled, (state, batch), b * length


def run(patterns, lengths, timed_lengths, tokens, rounds):
  rows = []
  for length in lengths:
    found = {p: measure(p, length, tokens) for p in patterns}
    speed = {p: [] for p in patterns}
    for r in range(rounds if length in timed_lengths else 0):
      for p in (patterns if r % 2 == 0 else patterns[::-1]):
        _, _, compiled, args, n = found[p]
        speed[p].append(n / timing.seconds_per_call(compiled, *args, samples=3))
    for p in patterns:
      attn, step, *_ = found[p]
      tps = statistics.median(speed[p]) if speed[p] else float("nan")
      rows.append(dict(pattern=p, length=length, batch=max(tokens // length, 1),
                       attn_mib=round(attn, 2), step_mib=round(step, 2),
                       tokens_per_s=round(tps, 1)))
      print(rows[-1], flush=True)
  return rows


def main(argv):
  del argv
  rows = run(FLAGS.patterns, [int(x) for x in FLAGS.lengths],
             [int(x) for x in FLAGS.timed_lengths], FLAGS.tokens, FLAGS.rounds)
  os.makedirs(FLAGS.outdir, exist_ok=True)
  path = os.path.join(FLAGS.outdir, "mlm_cost.csv")
  if os.path.exists(path) and not FLAGS.overwrite:
    raise SystemExit(f"error: {path} exists; pass --overwrite or another --outdir.")
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  print("| pattern | T | B | attention MiB (fwd+bwd) | step MiB | tokens/s |\n|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['pattern']} | {r['length']} | {r['batch']} | {r['attn_mib']} | {r['step_mib']} "
          f"| {r['tokens_per_s']} |")


def define_flags() -> None:
  flags.DEFINE_list("patterns", ["alternating", "global", "local"], "mlm.py variants.")
  flags.DEFINE_list("lengths", ["256", "1024", "4096"], "Sequence lengths (memory).")
  flags.DEFINE_list("timed_lengths", ["256", "1024"], "Lengths also timed.")
  flags.DEFINE_integer("tokens", 2048, "Tokens per batch (B = tokens // T, at least 1).")
  flags.DEFINE_integer("rounds", 3, "Side-by-side timing rounds.")
  flags.DEFINE_string("outdir", "/tmp/longctx_mlm_cost", "Where mlm_cost.csv goes.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing mlm_cost.csv.")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
