"""Compiled memory of one training step of a 1B model at 8K-128K tokens (compile only, exact).

    python -m experiments.benchmark --preset=memory128k --workdir=/tmp/longctx_memory

The model has Llama-3.2-1B's shape (`llama_1b`: 16 layers, d_model 2048, 32 query and 8 KV
heads of 64, SwiGLU MLP 8192, vocabulary 128256, tied embeddings, bf16 parameters and
activations). One step is exactly the trainer's (`trainer.train_step`: loss + gradient +
clipping + AdamW update; `optim.state_dtype` float32 by default: float32 master weights and
moments for the bf16 parameters), lowered with abstract inputs
(`jax.ShapeDtypeStruct`, nothing is allocated) and compiled for the host CPU; the numbers are
`compiled.memory_analysis()`:

* `args`: the step's inputs (parameters, AdamW state, the batch of one row); donated, so the
  updated state reuses them (`alias`) and the outputs add nothing beyond;
* `temp`: everything else the step holds at its peak (activations kept for the backward,
  logits, gradients, the optimizer's temporaries);
* per device for the `seq:8` rows (8 host devices; ring attention with the zig-zag layout,
  parameters replicated).

Settings (`SETTINGS`): the attention function, the remat policy (models/remat.py), the loss
chunk (models/chunked_loss.py; 0 = full `[1, T, V]` float32 logits), the MLP chunk
(`ModelConfig.mlp_chunk`: the MLP a chunk of positions at a time) and the mesh.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from experiments.configs import common
from experiments.training import sharding, trainer
from models import KindSettings, ModelConfig, Transformer

GIB = 2.0**30
MLP_CHUNK = 4096  # positions per MLP chunk in the tiled-MLP rows


@dataclasses.dataclass(frozen=True)
class Setting:
  name: str
  attention: str = "flash"
  remat: str = "none"
  loss_chunk: int = 0
  mlp_chunk: int = 0
  mesh: str = ""


SETTINGS = (
    Setting("dense + full logits, no remat", attention="dense"),
    Setting("flash"),
    Setting("flash + remat block", remat="block"),
    Setting("flash + remat block + chunked loss", remat="block", loss_chunk=-1),
    Setting("flash + remat dots + chunked loss", remat="dots", loss_chunk=-1),
    Setting("flash + remat block + chunked loss + tiled MLP", remat="block", loss_chunk=-1,
            mlp_chunk=MLP_CHUNK),
    Setting("seq:8 ring zig-zag + remat block + chunked loss + tiled MLP (per device)",
            remat="block", loss_chunk=-1, mlp_chunk=MLP_CHUNK, mesh="seq:8"),
)


def llama_1b(attention: str = "flash", remat: str = "none", **overrides) -> ModelConfig:
  """Llama-3.2-1B's shape (1.24B parameters) in bf16, attention and remat as given."""
  fields = dict(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                head_dim=64, mlp_dim=8192, mlp="swiglu", norm="rms", tie_embeddings=True,
                layer_pattern=("global",),
                kinds={"global": KindSettings(attention=attention, rope_theta=500_000.0)},
                dtype="bfloat16", param_dtype="bfloat16", remat=remat)
  fields.update(overrides)
  return ModelConfig(**fields)


def _train_config(setting: Setting):
  config = common.base_config()
  config.batch_size, config.num_steps = 1, 1000
  config.loss_chunk = setting.loss_chunk
  return config


def compile_step(setting: Setting, length: int, model_overrides: dict | None = None):
  """The compiled train step of `setting` at `length` tokens (batch 1); `model_overrides`
  change `llama_1b`'s fields (the tests' tiny model)."""
  mesh = sharding.make_mesh(setting.mesh) if setting.mesh else None
  model_config = sharding.ring_config(llama_1b(
      setting.attention, setting.remat, mlp_chunk=setting.mlp_chunk, **(model_overrides or {})),
      mesh)
  config = _train_config(setting)

  def build():
    model = Transformer(model_config, rngs=nnx.Rngs(0))
    return model, trainer.make_optimizer(model, config)

  graphdef, state = nnx.split(nnx.eval_shape(build))
  ints = jax.ShapeDtypeStruct((1, length), jnp.int32)
  batch = dict(tokens=ints, targets=ints, segment_ids=ints, positions=ints,
               loss_mask=jax.ShapeDtypeStruct((1, length), jnp.float32))

  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    metrics = trainer.train_step(model, optimizer, batch, loss_chunk=config.loss_chunk)
    return nnx.state((model, optimizer)), metrics

  if mesh is None:
    return jax.jit(step, donate_argnums=0).lower(state, batch).compile()
  replicated = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), state)
  rows = {k: sharding.batch_sharding(mesh) for k in batch}
  jitted = jax.jit(step, donate_argnums=0, in_shardings=(replicated, rows))
  with jax.sharding.set_mesh(mesh):
    return jitted.lower(state, batch).compile()


def measure(setting: Setting, length: int, model_overrides: dict | None = None) -> dict:
  """One table row: GiB of arguments, temp, outputs, aliased, and args + temp."""
  start = time.perf_counter()
  stats = compile_step(setting, length, model_overrides).memory_analysis()
  args, temp = stats.argument_size_in_bytes / GIB, stats.temp_size_in_bytes / GIB
  return dict(setting=setting.name, tokens=length, args_gib=round(args, 2),
              temp_gib=round(temp, 2), output_gib=round(stats.output_size_in_bytes / GIB, 2),
              alias_gib=round(stats.alias_size_in_bytes / GIB, 2),
              args_plus_temp_gib=round(args + temp, 2),
              compile_s=round(time.perf_counter() - start, 1))


def markdown(rows: list[dict]) -> str:
  lines = ["| setting | tokens | args GiB | temp GiB | args + temp GiB |",
           "|---|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['setting']} | {r['tokens']} | {r['args_gib']} | {r['temp_gib']} | "
                 f"{r['args_plus_temp_gib']} |")
  return "\n".join(lines)


def run(lengths: list[int], workdir: str, settings=SETTINGS,
        model_overrides: dict | None = None) -> list[dict]:
  """Measures every setting at every length (settings needing more devices than there are are
  reported and skipped); prints the table, writes `memory.csv` under `workdir` (rewritten
  after every row)."""
  rows = []
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "memory.csv")
  for setting in settings:
    if setting.mesh and len(jax.devices()) < 8:
      print(f"skipped {setting.name!r}: needs 8 devices, have {len(jax.devices())} (the preset "
            f"asks for 8 host devices when it runs first in its process).", flush=True)
      continue
    for length in lengths:
      rows.append(measure(setting, length, model_overrides))
      print(rows[-1], flush=True)
      with open(path, "w", newline="") as f:  # rewritten after each row: a long run keeps its rows
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
  print(markdown(rows), flush=True)
  return rows


def ask_for_host_devices(count: int = 8) -> None:
  """Makes the CPU backend hold `count` devices (the `seq:8` rows); only possible before JAX
  has initialised its backends, so the preset calls it first (else those rows are skipped)."""
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # backends already initialised: keep what there is
    pass
