"""Row 8: decode memory at 128K. Cache bytes per sequence by layer pattern, one model shape.

No training: `models.flops.cache_bytes` (each layer module's arithmetic over its cache class)
for one model shape, Qwen3-Next-80B-A3B's (48 layers, d_model 2048; attention 16 q heads and
2 KV heads of 256; gdn 16 q/k heads and 32 value heads of 128, conv width 4; bfloat16 cache),
with four layer patterns:

* global       every layer caches every position's K/V;
* alternating  local / global, the local layers a ring of `WINDOW` positions (Gemma 3's 1024);
* gdn:global   Qwen3-Next's 3:1: the gdn layers keep a conv tail and a float32 state;
* dsa          DeepSeek-V3.2: every layer is DSA, caching K/V and the lightning indexer's key
               per position (index_dim 128 in FP8 with one float32 scale per 128 dims).

Each count is checked twice against the caches the model really builds: `init_cache` at
`CHECK_LEN` tokens (allocated, then measured) and at 128K through `jax.eval_shape` (shapes
only). A mismatch is an error, not a row.
"""

from __future__ import annotations

import jax
from flax import nnx

from experiments.rows import base
from experiments.training import plots
from models import ModelConfig, Transformer, dsa_kind, flops, gdn_kind
from models import cache as cache_lib

LENGTH = 128 * 1024
CHECK_LEN = 64
WINDOW = 1024
SHAPE = dict(vocab_size=1024, d_model=2048, num_layers=48, num_heads=16, num_kv_heads=2,
             head_dim=256, mlp_dim=512, dtype="bfloat16")  # vocab and MLP do not touch caches
QUICK_SHAPE = dict(SHAPE, num_layers=4, d_model=256)
PATTERNS = {"global": ("global",), "alternating": ("local", "global"),
            "gdn:global": ("gdn", "gdn", "gdn", "global"), "dsa": ("dsa",)}
KINDS = {"local": dict(window=WINDOW),
         "gdn": gdn_kind(key_heads=16, value_heads=32, key_dim=128, value_dim=128),
         "dsa": dsa_kind(index_heads=64, index_dim=128, fp8=True, top_k=2048)}
COLUMNS = ("setting", "layers", "num_layers", "length", "cache_bytes", "bytes_per_token",
           "vs_global", "checked_len")


def model_config(setting: str, quick: bool) -> ModelConfig:
  return ModelConfig(**(QUICK_SHAPE if quick else SHAPE), layer_pattern=PATTERNS[setting],
                     kinds=KINDS)


def checked_bytes(config: ModelConfig, length: int) -> int:
  """`flops.cache_bytes(config, length)`, after checking it against built caches."""
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))  # no parameters made
  for n, cache in ((CHECK_LEN, model.init_cache(1, CHECK_LEN)),
                   (length, jax.eval_shape(lambda: model.init_cache(1, length)))):
    if flops.cache_bytes(config, n) != cache_lib.nbytes(cache):
      raise ValueError(f"cache_bytes({config.layer_pattern}, {n}) = "
                       f"{flops.cache_bytes(config, n)} but init_cache holds "
                       f"{cache_lib.nbytes(cache)} bytes.")
  return flops.cache_bytes(config, length)


def run(ctx: base.Context) -> base.Result:
  records = []
  for setting in PATTERNS:
    config = model_config(setting, ctx.quick)
    total = checked_bytes(config, LENGTH)
    records.append(dict(setting=setting, layers=base.layer_letters(config.layer_kinds[:4]),
                        num_layers=config.num_layers, length=LENGTH, cache_bytes=total,
                        bytes_per_token=total / LENGTH, vs_global=0.0, checked_len=CHECK_LEN))
  for r in records:
    r["vs_global"] = r["cache_bytes"] / records[0]["cache_bytes"]
  table = base.markdown_table(
      ["setting", "first layers", "cache per sequence at 128K (GiB)", "bytes per token",
       "vs global"],
      [[r["setting"], r["layers"], f"{r['cache_bytes'] / 2 ** 30:.3f}",
        f"{r['bytes_per_token']:.0f}", f"{r['vs_global']:.3f}"] for r in records])
  shape = QUICK_SHAPE if ctx.quick else SHAPE
  note = (f"{shape['num_layers']} layers, d_model {shape['d_model']}, attention "
          f"{shape['num_heads']} q / {shape['num_kv_heads']} KV heads of {shape['head_dim']}, "
          f"bfloat16 K/V; local window {WINDOW}; gdn 16 q/k heads and 32 value heads of 128 "
          f"(float32 state); DSA indexer keys 128 dims in FP8 + a float32 scale. Batch 1, "
          f"{LENGTH} tokens; every count equals `init_cache`'s bytes at {CHECK_LEN} tokens and "
          f"(shapes only) at {LENGTH}. No training: seeds do not apply.")
  configs = {s: model_config(s, ctx.quick) for s in PATTERNS}
  return base.Result(records, f"{table}\n\n{note}", lambda path: plot_lengths(configs, path))


def plot_lengths(configs: dict[str, ModelConfig], path: str) -> None:
  """Cache GiB per sequence against the decoded length (1K .. 128K, log-log), per pattern."""
  lengths = [2 ** i for i in range(10, 18)]
  fig, ax = plots.figure(figsize=(6, 4))
  for setting, config in configs.items():
    ax.plot(lengths, [flops.cache_bytes(config, n) / 2 ** 30 for n in lengths], marker="o",
            label=setting)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  plots.label(ax, xlabel="tokens in the cache", ylabel="cache per sequence (GiB)",
              title="Decode memory by layer pattern")
  plots.save(fig, path)


ROW = base.Row(number=8, name="decode_memory", title="Decode memory at 128K by layer pattern",
               columns=COLUMNS, run=run)
