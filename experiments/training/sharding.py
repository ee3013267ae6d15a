"""Sharded training on a JAX mesh: data parallelism, FSDP, and sequence (context) parallelism.

    mesh = make_mesh("data:2,seq:4")                    # 8 devices, axis types Auto
    model_config = ring_config(model_config, mesh)      # attention kinds -> "ring" if seq > 1
    model, optimizer = ..., ...
    shard_state(model, optimizer, mesh, fsdp=False)     # params + AdamW state onto the mesh
    with jax.sharding.set_mesh(mesh):                   # the ring layers read the ambient mesh
      metrics = trainer.train_step(model, optimizer, shard_batch(batch, mesh))

Everything is JAX's own SPMD machinery: `NamedSharding`s on the inputs of one `jax.jit`
program (XLA inserts the gradient all-reduces / FSDP all-gathers) and `shard_map` inside the
attention layers only.

* Batch `[B, T]` arrays are split `P("data", "seq")`: rows over `data`, tokens over `seq`.
  Embeddings, projections, MLPs and the loss are token-wise, so they need no communication.
* Parameters and optimizer state are replicated, or with `fsdp=True` each array is split over
  `data` along its largest divisible dimension (ZeRO-3 style: XLA gathers a weight where it is
  used and reduce-scatters its gradient).
* Token layout: causal ring attention is balanced only when each device holds an early and a
  late chunk of the sequence (attention/ring_layout.py, "zigzag": chunks r and 2P-1-r). So for
  a causal model whose every layer runs ring attention, `ring_config` picks the zig-zag
  layout and `shard_batch(..., layout=batch_layout(model.config))` permutes each host batch
  ONCE (tokens, targets, masks, segment ids, plus explicit `positions` and `next_in_doc`
  computed before permuting): no layer permutes anything, the loss is a sum over tokens, and
  the per-device causal work is equal (max / mean 1.0 vs ~1.9 contiguous on 8 devices).
* Attention is the only token-mixing op. With `seq > 1`, `ring_config` switches every layer
  kind whose attention is exact and parameter-free ("flash", "local", "dense") to "ring"
  (`attention.ring`): global layers pass K/V blocks around the ring; local (sliding-window)
  layers reuse the same call, whose plan visits only the blocks the window reaches: a window
  `w <= T / seq` exchanges one neighbour block (the halo) and computes O(T * w). Other kinds
  (e.g. "dsa") are left to XLA's sharding propagation. A kind's `options` reach the ring call:
  `{"head_chunks": 4}` runs it per group of kv heads (~1/4 of its temporary memory).
* Several hosts: `initialize_distributed()` (`jax.distributed.initialize()`, configured by the
  cluster environment: SLURM, Cloud TPU, or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID variables) before anything touches a device. Every process computes the same
  global batch (batches are a pure function of (seed, step)) and contributes the shards of its
  own devices (`jax.make_array_from_callback`), so one code path serves 1 to N hosts.

Checkpoints (orbax) are saved from sharded arrays and restored onto whatever shardings the
target state has: restoring a data:8 run on one device or on data:2,seq:4 is just restoring
into a model placed by `shard_state` on the new mesh (tests/experiments/training/test_sharding.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import jax.numpy as jnp
from attention import ring_layout
from models import KindSettings, ModelConfig, positions_from_segments
from models.partition import param_spec  # the FSDP rule models.hf.load shares; re-exported

DATA, SEQ = "data", "seq"
AXES = (DATA, SEQ)
# Attention functions that compute exact attention from the Mask alone: "ring" replaces them.
RING_REPLACES = ("flash", "local", "dense")


# --- mesh ---------------------------------------------------------------------------------------


def parse_mesh(spec: str) -> dict[str, int]:
  """`"data:2,seq:4"` -> `{"data": 2, "seq": 4}`; one size may be -1 (all remaining devices)."""
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"mesh must be a string like 'data:2,seq:4', got {spec!r}.")
  axes: dict[str, int] = {}
  for part in spec.split(","):
    name, sep, size = part.strip().partition(":")
    if not sep or name not in AXES or name in axes:
      raise ValueError(f"bad mesh {spec!r}: each entry is 'axis:size' with axis one of {AXES}, "
                       f"each at most once (e.g. 'data:2,seq:4').")
    try:
      axes[name] = int(size)
    except ValueError:
      raise ValueError(f"bad mesh {spec!r}: size of {name!r} must be an int, got {size!r}."
                       ) from None
    if axes[name] < 1 and axes[name] != -1:
      raise ValueError(f"bad mesh {spec!r}: sizes must be >= 1 (or -1 for the rest).")
  if list(axes.values()).count(-1) > 1:
    raise ValueError(f"bad mesh {spec!r}: at most one axis may have size -1.")
  return axes


def make_mesh(spec: str, devices=None) -> Mesh:
  """A `Mesh` with axes `("data", "seq")` (missing ones have size 1), axis types Auto.

  Uses all devices (`jax.devices()` across every process) unless `devices` is given; the
  sizes must multiply to their number. Auto axes let `jit` propagate shardings through the
  model code, which carries no sharding annotations.
  """
  devices = list(jax.devices() if devices is None else devices)
  axes = parse_mesh(spec)
  known = math.prod(size for size in axes.values() if size != -1)
  for name, size in axes.items():
    if size == -1:
      if len(devices) % known:
        raise ValueError(f"mesh {spec!r}: {len(devices)} devices do not divide by {known}.")
      axes[name] = len(devices) // known
  shape = tuple(axes.get(name, 1) for name in AXES)
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh {spec!r} has {math.prod(shape)} devices but {len(devices)} are "
                     f"available (jax.devices()); make the sizes multiply to {len(devices)}.")
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def initialize_distributed(**kwargs) -> None:
  """`jax.distributed.initialize()` for multi-host runs; call before anything uses a device.

  The cluster is detected (SLURM, Open MPI, Kubernetes, Cloud TPU), or given by environment
  variables on every process: `JAX_COORDINATOR_ADDRESS=host:port` (process 0's host),
  `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (the last two read here: jax reads only the first).
  `kwargs` (e.g. `local_device_ids`) are passed on.
  """
  for name, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if key not in kwargs and os.environ.get(name):
      kwargs[key] = int(os.environ[name])
  jax.distributed.initialize(**kwargs)


# --- model: ring attention where the sequence is split ----------------------------------------


def ring_config(config: ModelConfig, mesh: Mesh | None, layout: str | None = None
                ) -> ModelConfig:
  """`config` with kinds using `RING_REPLACES` attention switched to "ring" when `seq > 1`.

  The ring call computes the same function (the layer's Mask carries causality, window and
  segment ids), so parameters and checkpoints are unchanged; the mesh is read at trace time
  from `jax.sharding.set_mesh`. Every ring kind gets the options `layout` (the token layout of
  the batches, `batch_layout`) and `permuted=True`. `layout` None: "zigzag" for a causal
  model whose every kind runs ring attention, else "contiguous"; "zigzag" needs every kind to
  run ring attention (other kinds would see permuted tokens). Unchanged when there is no mesh
  or `seq == 1`.
  """
  if mesh is None or mesh.shape.get(SEQ, 1) == 1:
    return config
  kinds = dict(config.kinds)
  names = sorted(set(config.layer_pattern))
  ring_kinds = [k for k in names if config.kind_settings(k).attention in RING_REPLACES + ("ring",)]
  if layout is None:
    layout = "zigzag" if config.causal and ring_kinds == names else "contiguous"
  if ring_layout.check_layout(layout) != "contiguous" and ring_kinds != names:
    raise ValueError(f"ring layout {layout!r} permutes the tokens, but layer kinds "
                     f"{sorted(set(names) - set(ring_kinds))} do not run ring attention; use "
                     f"layout='contiguous'.")
  for kind in ring_kinds:
    settings = kinds.get(kind, KindSettings())
    options = dict(config.kind_settings(kind).options or (), layout=layout, permuted=True)
    kinds[kind] = dataclasses.replace(settings, attention="ring", options=options)
  return dataclasses.replace(config, kinds=kinds)


def batch_layout(config: ModelConfig) -> str:
  """The token layout `ring_config` chose for `config`'s ring layers ("contiguous" if none)."""
  layouts = {dict(config.kind_settings(k).options or ()).get("layout", "contiguous")
             for k in set(config.layer_pattern) if config.kind_settings(k).attention == "ring"}
  if len(layouts) > 1:
    raise ValueError(f"ring layers disagree on the token layout: {sorted(layouts)}.")
  return layouts.pop() if layouts else "contiguous"


def check_divisible(mesh: Mesh, batch_size: int, seq_len: int) -> None:
  """ValueError unless the batch splits over `data` and the sequence over `seq`."""
  data, seq = mesh.shape.get(DATA, 1), mesh.shape.get(SEQ, 1)
  if batch_size % data:
    raise ValueError(f"batch_size {batch_size} must be divisible by the mesh's data axis "
                     f"({data}).")
  if seq_len % seq:
    raise ValueError(f"sequence length {seq_len} must be divisible by the mesh's seq axis "
                     f"({seq}).")


# --- placing arrays -----------------------------------------------------------------------------


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """`[B, T, ...]` arrays: rows over `data`, tokens over `seq`."""
  return NamedSharding(mesh, P(DATA, SEQ))


def state_shardings(state: Any, mesh: Mesh, fsdp: bool = False) -> Any:
  """A pytree of `NamedSharding`s matching `state` (params or optimizer state)."""
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), mesh, fsdp)), state)


def put(tree: Any, shardings: Any) -> Any:
  """Global arrays with `shardings` from host values every process holds in full.

  `jax.make_array_from_callback` asks each process only for its own devices' shards, so this
  works on one host and on many (where `jax.device_put` of a host value could not).
  """
  def place(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(place, tree, shardings)


def shard_state(model: nnx.Module, optimizer: nnx.Optimizer | None, mesh: Mesh,
                fsdp: bool = False) -> None:
  """Moves the model (and optimizer) state onto `mesh` in place: replicated or FSDP-split."""
  for obj in (model, optimizer):
    if obj is None:
      continue
    state = nnx.state(obj)
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state)
    nnx.update(obj, put(host, state_shardings(host, mesh, fsdp)))


def next_in_doc(segment_ids):
  """`[B, T]` bool: token t's target (token t + 1) is in t's document (not padding): what the
  LM loss needs from token adjacency, computed before any permutation."""
  same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] >= 0)
  return jnp.concatenate([same, jnp.zeros_like(same[:, :1])], axis=1)


def layout_batch(batch: Mapping[str, np.ndarray], layout: str, num_devices: int
                 ) -> dict[str, np.ndarray]:
  """A host batch with every `[B, T, ...]` array in `layout` (`ring_layout.to_layout`), after
  adding what depends on token order: `positions` (restarting per document) and
  `next_in_doc`. A no-op for "contiguous"."""
  if layout == "contiguous":
    return dict(batch)
  batch = {key: np.asarray(value) for key, value in batch.items()}
  seg = batch["segment_ids"]
  batch.setdefault("positions", np.asarray(positions_from_segments(jnp.asarray(seg))))
  batch.setdefault("next_in_doc", np.asarray(next_in_doc(seg)))
  t = seg.shape[1]
  return {key: ring_layout.to_layout(value, layout, num_devices) if value.ndim >= 2 and
          value.shape[1] == t else value for key, value in batch.items()}


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, layout: str = "contiguous"
                ) -> dict[str, jax.Array]:
  """A host batch (the same global batch on every process) as `P("data", "seq")` arrays, its
  tokens in `layout` (`layout_batch`; `batch_layout(model.config)` says which)."""
  sharding = batch_sharding(mesh)
  batch = layout_batch(batch, layout, mesh.shape.get(SEQ, 1))
  return {key: put(np.asarray(value), sharding) for key, value in batch.items()}


def describe(mesh: Mesh | None, fsdp: bool = False) -> dict[str, Any]:
  """Mesh summary for logs."""
  if mesh is None:
    return {"mesh": None}
  return {"mesh": dict(mesh.shape), "fsdp": fsdp, "processes": jax.process_count(),
          "devices": mesh.devices.size}
