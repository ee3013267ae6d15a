"""Text corpora shared by the tasks: files from a glob as bytes or a tokenizer's tokens, and the
row cutting and epoch order of packed language-model rows.

The default corpus is the Python standard library's own `*.py` files (found via `sysconfig`,
so nothing is downloaded).

    data, ids = load_tokens(glob, max_bytes, "bytes")   # tokens [N], document id [N]
    row = lm_window(data[lo:lo + T + 1], ids[lo:lo + T + 1])
"""

from __future__ import annotations

import functools
import glob as glob_lib
import os
import sysconfig
from typing import Callable

import numpy as np

from experiments.data import tokenizer as tokenizer_lib

DEFAULT_TEXT_GLOB = os.path.join(sysconfig.get_paths()["stdlib"], "*.py")


def encode(text: str) -> np.ndarray:
  """UTF-8 bytes of `text` as int32 tokens."""
  return tokenizer_lib.load().encode(text)


def decode(tokens) -> str:
  """Byte tokens back to text (invalid bytes replaced)."""
  return tokenizer_lib.load().decode(tokens)


def matching_files(pattern: str) -> list[str]:
  """The files matching `pattern` (`**` recursive), sorted."""
  return sorted(f for f in glob_lib.glob(os.path.expanduser(pattern), recursive=True)
                if os.path.isfile(f))


def read_files(pattern: str, max_bytes: int) -> list[bytes]:
  """The non-empty contents of the sorted files matching `pattern`, at most `max_bytes` in
  all (the last file read is cut there)."""
  docs, total = [], 0
  for path in matching_files(pattern):
    with open(path, "rb") as f:
      data = f.read(max_bytes - total)
    if data:
      docs.append(data)
      total += len(data)
    if total >= max_bytes:
      break
  if not docs:
    raise ValueError(f"text: no readable, non-empty files match {pattern!r}.")
  return docs


@functools.lru_cache(maxsize=4)
def load_corpus(pattern: str, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
  """(bytes [N] int32, document id [N] int32) of the sorted files matching `pattern`."""
  docs = [np.frombuffer(d, np.uint8) for d in read_files(pattern, max_bytes)]
  ids = np.concatenate([np.full(len(d), i, np.int32) for i, d in enumerate(docs)])
  return np.concatenate(docs).astype(np.int32), ids


@functools.lru_cache(maxsize=4)
def load_tokens(pattern: str, max_bytes: int, tokenizer: str = tokenizer_lib.BYTES
                ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [N] int32, document id [N] int32): each file (as `read_files` reads it, decoded
  as UTF-8) tokenized and framed (BOS/EOS) by `tokenizer`; bytes: `load_corpus` exactly."""
  if tokenizer_lib.is_bytes(tokenizer):
    return load_corpus(pattern, max_bytes)
  tok = tokenizer_lib.load(tokenizer)
  texts = [d.decode("utf-8", errors="replace") for d in read_files(pattern, max_bytes)]
  docs = [tok.frame(ids) for ids in tok.encode_batch(texts)]
  ids = np.concatenate([np.full(len(d), i, np.int32) for i, d in enumerate(docs)])
  return np.concatenate(docs).astype(np.int32), ids


def lm_window(chunk: np.ndarray, doc: np.ndarray) -> dict[str, np.ndarray]:
  """A packed LM row from `T + 1` tokens and their document ids: `tokens`/`targets` shifted by
  one, `segment_ids` numbering the documents from 0, a token scored only when its target is in
  the same document."""
  _, segment_ids = np.unique(doc[:-1], return_inverse=True)
  return dict(tokens=chunk[:-1].astype(np.int32), targets=chunk[1:].astype(np.int32),
              loss_mask=(doc[1:] == doc[:-1]).astype(np.float32),
              segment_ids=segment_ids.astype(np.int32).reshape(-1))


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order in which an epoch visits `n` rows."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_rows(row: Callable[[int], dict[str, np.ndarray]], n: int, seed: int, step: int,
               batch_size: int) -> dict[str, np.ndarray]:
  """Rows `step * B .. (step + 1) * B` of epochs that each visit rows `0..n-1` in the order
  `epoch_order(seed, epoch, n)`, stacked: a pure function of (seed, step)."""
  rows = []
  for i in range(step * batch_size, (step + 1) * batch_size):
    epoch, offset = divmod(i, n)
    rows.append(row(int(epoch_order(seed, epoch, n)[offset])))
  return {key: np.stack([r[key] for r in rows]) for key in rows[0]}
