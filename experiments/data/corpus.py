"""Byte-level text: encoding, and a corpus of files read from a glob (shared by the tasks).

The default corpus is the Python standard library's own `*.py` files (found via `sysconfig`,
so nothing is downloaded).
"""

from __future__ import annotations

import functools
import glob as glob_lib
import os
import sysconfig

import numpy as np

DEFAULT_TEXT_GLOB = os.path.join(sysconfig.get_paths()["stdlib"], "*.py")


def encode(text: str) -> np.ndarray:
  """UTF-8 bytes of `text` as int32 tokens."""
  return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(tokens) -> str:
  """Byte tokens back to text (invalid bytes replaced)."""
  return bytes(int(t) % 256 for t in tokens).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=4)
def load_corpus(pattern: str, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
  """(bytes [N] int32, document id [N] int32) of the sorted files matching `pattern`."""
  files = sorted(f for f in glob_lib.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(f))
  docs, total = [], 0
  for path in files:
    with open(path, "rb") as f:
      data = f.read(max_bytes - total)
    if data:
      docs.append(np.frombuffer(data, np.uint8))
      total += len(data)
    if total >= max_bytes:
      break
  if not docs:
    raise ValueError(f"text: no readable, non-empty files match {pattern!r}.")
  ids = np.concatenate([np.full(len(d), i, np.int32) for i, d in enumerate(docs)])
  return np.concatenate(docs).astype(np.int32), ids
