"""The blocks of a Transformer under one `lax.scan` over repeats of the layer pattern.

    x, layer_aux = run_blocks(blocks, period=len(pattern), x=x, positions=..., segment_ids=...,
                              remat="block", scan=True)

With a pattern of `P` kinds over `L` layers, layers `r P .. r P + P - 1` form repeat `r`; all
`R = L // P` repeats have the same structure, so their parameters are stacked along a new
leading axis (`[R, ...]` per leaf) and `lax.scan` runs one repeat per step: XLA compiles one
repeat instead of `L` layers (compile time stops growing with depth), and the remat policy
(models/remat.py) on the scan body makes the backward keep only what the policy saves per
step (e.g. "block": the residual stream entering each repeat). This is MaxText's
`scan_layers`; Gemma's 5:1 local:global pattern scans over its 6-layer repeats.

Layers outside the scan run one by one, under the same policy: the `L % P` remainder layers,
repeat 0 when its structure differs from the others (ModernBERT's layer 0 has no
attention pre-norm), and the last repeats when theirs differ (`ModelConfig.last_layers`, MoBA's
hybrid with its last layers full attention).

The parameter tree does not change: each `Block` keeps its own parameters (so checkpoints,
Hugging Face import/export and FSDP partitioning see `blocks.{i}` as before); the stacking
happens inside the traced step. It costs one copy of the scanned blocks' parameters (and of
their gradients) in temporary memory; the activations it saves are far larger at long context.

Results equal the unrolled loop (`scan=False`) in value and gradient. Each layer's aux dict
(e.g. DSA's `indexer_kl`) is returned per layer, in layer order, as the loop would.
KV-cache decoding does not come here: the model loops over the layers itself.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jaxtyping import Array, Float, Int

from models import remat as remat_lib


def _group_fn(graphdefs: Sequence[Any], positions, segment_ids):
  """`(x, states) -> (x, aux tuple)`: the blocks of `graphdefs` (with `states`) in order."""

  def run(x, states):
    aux = []
    for graphdef, state in zip(graphdefs, states):
      block = nnx.merge(graphdef, state)
      x, _, layer_aux = block(x, positions, segment_ids, None, None)
      aux.append(layer_aux)
    return x, tuple(aux)

  return run


def _structure(split) -> Any:
  graphdef, state = split
  leaves, treedef = jax.tree_util.tree_flatten(state)
  return graphdef, treedef, tuple((leaf.shape, leaf.dtype) for leaf in leaves)


def run_blocks(blocks: Sequence[nnx.Module], *, period: int, x: Float[Array, "B T D"],
               positions: Int[Array, "B T"], segment_ids: Int[Array, "B T"] | None,
               remat: str, scan: bool = True) -> tuple[Float[Array, "B T D"], tuple[dict, ...]]:
  """Runs `blocks` on `x` (no cache): scanned over repeats of `period` layers when `scan`,
  else one by one; each group of layers under `remat`'s checkpoint policy.

  Returns the output `[B, T, D]` and one aux dict per layer (layer order).
  """
  splits = [nnx.split(block) for block in blocks]
  repeats = len(blocks) // period if scan else 0
  structure = [tuple(_structure(s) for s in splits[r * period:(r + 1) * period])
               for r in range(repeats)]
  first = 1 if repeats > 1 and structure[0] != structure[1] else 0
  while repeats > first and structure[repeats - 1] != structure[first]:
    repeats -= 1  # a tail that differs (`ModelConfig.last_layers`) runs unrolled after the scan
  if repeats - first < 2 or len(set(structure[first:repeats])) > 1:  # nothing uniform to scan
    first = repeats = 0
  scanned = range(first * period, repeats * period)
  layer_aux: list[dict] = []

  def unrolled(x, layers):
    for i in layers:  # one checkpointed group per layer
      graphdef, state = splits[i]
      group = remat_lib.checkpointed(_group_fn([graphdef], positions, segment_ids), remat,
                                     in_scan=False)
      x, (aux,) = group(x, [state])
      layer_aux.append(aux)
    return x

  x = unrolled(x, range(0, scanned.start))
  if len(scanned):
    graphdefs = [splits[i][0] for i in scanned[:period]]
    stacked = [jax.tree.map(lambda *leaves: jnp.stack(leaves),
                            *[splits[i][1] for i in scanned[p::period]]) for p in range(period)]
    body = remat_lib.checkpointed(_group_fn(graphdefs, positions, segment_ids), remat,
                                  in_scan=True)
    x, aux = lax.scan(body, x, stacked)  # aux: per position p, leaves [R', ...]
    for r in range(len(scanned) // period):
      layer_aux.extend(jax.tree.map(lambda a: a[r], aux[p]) for p in range(period))
  x = unrolled(x, range(scanned.stop, len(blocks)))
  return x, tuple(layer_aux)
