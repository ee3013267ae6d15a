"""How one NNX parameter is made of Hugging Face tensors, both ways.

A `Param` is the NNX parameter at `path` (dotted: "blocks.0.attn.q_proj.kernel") built from
`parts`: each `Part` is an HF tensor (optionally a range of its rows: ModernBERT's fused Wqkv),
optionally transposed (torch `Linear` weights are `[out, in]`, NNX kernels `[in, ...out]`), and
reshaped; several parts are concatenated along `axis` (the MLP's fused `[gate | up]` kernel).
`split` says how the NNX axes group into the (transposed) HF axes, e.g. `(1, 2)`: `[D, N, H]`
is `[D, N * H]`.

`read_block(ckpt, param, shape, box)` returns any box of the NNX parameter and reads only the
HF rows/columns that box needs (their bounding box, `Checkpoint.read`), so an FSDP shard is
loaded without the rest of the tensor; `to_hf(param, value)` gives the HF tensors back.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Part:
  """An HF tensor `name` (rows `rows[0]:rows[1]` of it, if set), transposed if `transpose`."""

  name: str
  rows: tuple[int, int] | None = None
  transpose: bool = False


@dataclasses.dataclass(frozen=True)
class Param:
  """NNX parameter `path` = concat over `axis` of each part, reshaped by `split`."""

  path: str
  parts: tuple[Part, ...]
  split: tuple[int, ...]
  axis: int = -1


def linear(path: str, name: str, split: tuple[int, ...] = (1, 1), rows=None) -> Param:
  """A torch `Linear` weight `[out, in]` as an NNX kernel `[in..., out...]`."""
  return Param(path, (Part(name, rows, transpose=True),), split)


def plain(path: str, name: str, split: tuple[int, ...] = (1,), rows=None) -> Param:
  """An HF tensor taken as it is (reshaped by `split`): norms, biases, embeddings."""
  return Param(path, (Part(name, rows),), split)


def _part_shape(param: Param, shape: tuple[int, ...]) -> tuple[int, ...]:
  axis = param.axis % len(shape)
  n = len(param.parts)
  if shape[axis] % n:
    raise ValueError(f"{param.path}: axis {axis} of {shape} does not split into {n} parts.")
  return shape[:axis] + (shape[axis] // n,) + shape[axis + 1:]


def _groups(split: tuple[int, ...]) -> list[range]:
  starts = np.cumsum((0,) + split)
  return [range(starts[i], starts[i + 1]) for i in range(len(split))]


def hf_shape(param: Param, part: Part, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape the HF tensor (rows range, before transposing) of `part` must have."""
  local = _part_shape(param, shape)
  if sum(param.split) != len(local):
    raise ValueError(f"{param.path}: split {param.split} does not cover shape {local}.")
  grouped = tuple(math.prod(local[a] for a in group) for group in _groups(param.split))
  return grouped[::-1] if part.transpose else grouped


def _indices(box: tuple[slice, ...], dims: range, shape: tuple[int, ...]) -> np.ndarray:
  """Row-major flat indices, within the merged axis, of the box's slices on `dims`."""
  flat = np.zeros((1,), np.int64)
  for a in dims:
    start, stop, _ = box[a].indices(shape[a])
    flat = (flat[:, None] * shape[a] + np.arange(start, stop)[None, :]).reshape(-1)
  return flat


def _take(ckpt, part: Part, index: list[np.ndarray]) -> np.ndarray:
  """Reads the bounding box of `index` (per HF axis) and picks those entries."""
  offset = part.rows[0] if part.rows else 0
  lows = [int(i.min()) if i.size else 0 for i in index]
  box = tuple(slice(lo + (offset if a == 0 else 0),
                    (int(i.max()) + 1 if i.size else lo) + (offset if a == 0 else 0))
              for a, (lo, i) in enumerate(zip(lows, index)))
  block = ckpt.read(part.name, box)
  for a, (lo, i) in enumerate(zip(lows, index)):
    if i.size and not np.array_equal(i, np.arange(lo, lo + i.size)):
      block = np.take(block, i - lo, axis=a)
  return block


def read_block(ckpt, param: Param, shape: tuple[int, ...],
               box: tuple[slice, ...] | None = None) -> np.ndarray:
  """`box` (default: all) of the NNX parameter `param` of `shape`, in the stored dtype."""
  box = tuple(slice(None) for _ in shape) if box is None else tuple(box)
  axis, local = param.axis % len(shape), _part_shape(param, shape)
  start, stop, _ = box[axis].indices(shape[axis])
  blocks = []
  for j, part in enumerate(param.parts):
    lo, hi = max(start, j * local[axis]), min(stop, (j + 1) * local[axis])
    if lo >= hi and len(param.parts) > 1:
      continue
    sub = box[:axis] + (slice(lo - j * local[axis], hi - j * local[axis]),) + box[axis + 1:]
    index = [_indices(sub, group, local) for group in _groups(param.split)]
    if part.transpose:
      index = index[::-1]
    block = _take(ckpt, part, index)
    if part.transpose:
      block = block.T
    blocks.append(block.reshape([len(range(*sub[a].indices(local[a]))) for a in range(len(local))]))
  return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=axis)


def to_hf(param: Param, value: np.ndarray) -> list[tuple[Part, np.ndarray]]:
  """`(part, HF tensor or its rows)` for each part of the NNX parameter `value`."""
  shape = tuple(value.shape)
  pieces = np.split(value, len(param.parts), axis=param.axis % len(shape))
  out = []
  for part, piece in zip(param.parts, pieces):
    grouped = hf_shape(param, part, shape)
    piece = piece.reshape(grouped[::-1] if part.transpose else grouped)
    out.append((part, np.ascontiguousarray(piece.T if part.transpose else piece)))
  return out
