"""Token files: a tokenized corpus larger than memory, read back through `np.memmap`.

A token file is a directory (`python -m experiments.tokenize` writes one):

* `tokens.bin`   every document's framed tokens (BOS, text, EOS: `Tokenizer.frame`), one after
                 the other, raw little-endian `uint16` when the vocabulary fits, else `uint32`;
* `offsets.npy`  int64 `[D + 1]`: document `i` is `tokens[offsets[i]:offsets[i + 1]]`;
* `header.json`  format and version, dtype, counts (tokens, documents, input bytes), the
                 tokenizer (spec, `hash`, vocabulary size, BOS/EOS ids) and the sources.

    with TokenWriter(out, tok, sources="corpus/*.txt") as writer:
      writer.add([tok.frame(ids) for ids in tok.encode_batch(texts)], nbytes)
    tf = open_token_file(out)              # memory-mapped; nothing is read until sliced
    tf.check_tokenizer(tok)                # ValueError naming both hashes if they differ
    tf.document(3)                         # int array of document 3's framed tokens

The header is written last (and removed first when overwriting), so a directory with a header
holds a complete file; a writer that fails removes what it wrote.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import numpy as np

from experiments.data import tokenizer as tokenizer_lib

FORMAT, VERSION = "longctx-tokens", 1
TOKENS, OFFSETS, HEADER = "tokens.bin", "offsets.npy", "header.json"


def is_token_file(path: str) -> bool:
  return os.path.isfile(os.path.join(os.path.expanduser(path), HEADER))


class TokenWriter:
  """Appends framed documents to a new token file in `path` (see the module docstring).

  Refuses (`FileExistsError`) a directory that already holds a token file unless
  `overwrite`. `extra` fields (e.g. `sources`) go into the header.
  """

  def __init__(self, path: str, tok: tokenizer_lib.Tokenizer, *, overwrite: bool = False,
               **extra: Any):
    self.path = os.path.abspath(os.path.expanduser(path))
    if is_token_file(self.path) and not overwrite:
      raise FileExistsError(f"{self.path} already holds a token file; pass another output "
                            f"directory, or --overwrite to replace it.")
    os.makedirs(self.path, exist_ok=True)
    for name in (HEADER, TOKENS, OFFSETS):  # the header first: never a stale complete file
      if os.path.exists(os.path.join(self.path, name)):
        os.remove(os.path.join(self.path, name))
    self.tok, self.extra = tok, extra
    self.dtype = tokenizer_lib.token_dtype(tok.vocab_size).newbyteorder("<")
    self.file = open(os.path.join(self.path, TOKENS + ".partial"), "wb")
    self.lengths: list[int] = []
    self.input_bytes = 0

  def add(self, docs: list[np.ndarray], input_bytes: int = 0) -> int:
    """Appends `docs` (each one framed document's tokens); returns the tokens written."""
    if not docs:
      return 0
    tokens = np.concatenate(docs)
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.tok.vocab_size):
      raise ValueError(f"token ids must be in [0, {self.tok.vocab_size}), got "
                       f"[{tokens.min()}, {tokens.max()}].")
    self.file.write(tokens.astype(self.dtype).tobytes())
    self.lengths.extend(len(d) for d in docs)
    self.input_bytes += input_bytes
    return len(tokens)

  def close(self) -> dict[str, Any]:
    """Finishes the file (offsets, then the header); returns the header."""
    self.file.close()
    if not self.lengths:
      self.abort()
      raise ValueError(f"no documents to write into {self.path}.")
    offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
    np.save(os.path.join(self.path, OFFSETS), offsets)
    os.replace(self.file.name, os.path.join(self.path, TOKENS))
    header = dict(format=FORMAT, version=VERSION, dtype=self.dtype.name,
                  num_tokens=int(offsets[-1]), num_documents=len(self.lengths),
                  input_bytes=self.input_bytes, **self.tok.framing(), **self.extra)
    partial = os.path.join(self.path, HEADER + ".partial")
    with open(partial, "w") as f:
      json.dump(header, f, indent=2, sort_keys=True)
    os.replace(partial, os.path.join(self.path, HEADER))
    return header

  def abort(self) -> None:
    """Removes what this writer wrote (after an error)."""
    self.file.close()
    for name in (TOKENS + ".partial", OFFSETS):
      if os.path.exists(os.path.join(self.path, name)):
        os.remove(os.path.join(self.path, name))

  def __enter__(self) -> "TokenWriter":
    return self

  def __exit__(self, kind, value, traceback) -> None:
    if kind is None:
      self.close()
    else:
      self.abort()


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: one per opened version
class TokenFile:
  """A token file opened for reading: `tokens` memory-mapped `[N]`, `offsets` `[D + 1]`."""

  path: str
  header: dict[str, Any]
  tokens: np.ndarray
  offsets: np.ndarray

  @property
  def num_documents(self) -> int:
    return len(self.offsets) - 1

  def document(self, index: int) -> np.ndarray:
    """Document `index`'s framed tokens, int32."""
    return np.asarray(self.tokens[self.offsets[index]:self.offsets[index + 1]], np.int32)

  def check_tokenizer(self, tok: tokenizer_lib.Tokenizer) -> None:
    """Raises `ValueError` naming both hashes unless the file was made with `tok`."""
    made = self.header["tokenizer_hash"]
    if made != tok.hash:
      raise ValueError(
          f"token file {self.path} was made with tokenizer {self.header['tokenizer']!r} (hash "
          f"{made}), not with task.tokenizer={tok.spec!r} (hash {tok.hash}); set "
          f"task.tokenizer to the file's tokenizer or tokenize the corpus again.")


def open_token_file(path: str) -> TokenFile:
  """The token file in directory `path` (checked against its header; nothing is read yet).
  Opened once per process and version of the file (a rewritten file is opened again)."""
  path = os.path.abspath(os.path.expanduser(path))
  if not is_token_file(path):
    raise ValueError(f"{path} is not a token file (no {HEADER}); make one with "
                     f"`python -m experiments.tokenize --input=GLOB --output={path}`.")
  return _open(path, os.stat(os.path.join(path, HEADER)).st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _open(path: str, stamp: int) -> TokenFile:
  del stamp  # only the cache key: the header's modification time
  with open(os.path.join(path, HEADER)) as f:
    header = json.load(f)
  if header.get("format") != FORMAT or header.get("version") != VERSION:
    raise ValueError(f"{path}: format {header.get('format')!r} version "
                     f"{header.get('version')!r}; this reader reads {FORMAT!r} version {VERSION}.")
  dtype = np.dtype(header["dtype"]).newbyteorder("<")
  size = os.path.getsize(os.path.join(path, TOKENS))
  if size != header["num_tokens"] * dtype.itemsize:
    raise ValueError(f"{path}: {TOKENS} holds {size} bytes, the header says "
                     f"{header['num_tokens']} {dtype.name} tokens; the file is damaged.")
  tokens = np.memmap(os.path.join(path, TOKENS), dtype=dtype, mode="r")
  offsets = np.load(os.path.join(path, OFFSETS), mmap_mode="r")
  return TokenFile(path, header, tokens, offsets)
