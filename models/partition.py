"""Where a parameter lives on a mesh: replicated, or FSDP-split over the `data` axis.

    spec = param_spec(shape, mesh, fsdp=True)    # P(None, "data") for a [64, 256] weight on data:8
    sharding = param_sharding(shape, mesh, fsdp=True)

The rule (ZeRO-3 style): an array is split over `data` along its largest dimension that the
axis size divides (the first such on ties); arrays with no divisible dimension, scalars, and
everything when `fsdp=False` or `data` has size 1 are replicated. XLA gathers a weight where it
is used. The experiments' sharding code and `models.hf.load(..., mesh=)` share this one rule.
"""

from __future__ import annotations

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def param_spec(shape: tuple[int, ...], mesh: Mesh, fsdp: bool) -> P:
  """Replicated, or (FSDP) split over `data` along the largest dimension it divides."""
  data = mesh.shape.get(DATA, 1)
  if not fsdp or data == 1 or not shape:
    return P()
  candidates = [d for d in range(len(shape)) if shape[d] % data == 0]
  if not candidates:
    return P()
  dim = max(candidates, key=lambda d: (shape[d], -d))
  return P(*([None] * dim + [DATA]))


def param_sharding(shape: tuple[int, ...], mesh: Mesh, fsdp: bool = True) -> NamedSharding:
  """`NamedSharding(mesh, param_spec(shape, mesh, fsdp))`."""
  return NamedSharding(mesh, param_spec(tuple(shape), mesh, fsdp))
