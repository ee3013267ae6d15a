"""Tokenizers for the tasks and token files: bytes (the default) or a local `tokenizer.json`.

    tok = load("bytes")                        # UTF-8 bytes 0..255: the tasks' own behaviour
    tok = load("/ckpt/llama")                  # tokenizer.json (+ tokenizer_config.json, ...)
    ids = tok.encode("The pass key is 7341.")  # int32 [N], no special tokens
    doc = tok.frame(ids)                       # [BOS] ids [EOS], as the tokenizer defines them
    text = tok.decode(ids)

A spec is `"bytes"` (or `""`), a `tokenizer.json` file, or a directory holding one, optionally
with `tokenizer_config.json` / `special_tokens_map.json` (a Hugging Face snapshot). Nothing is
downloaded. Documents are framed as the tokenizer defines them:

* BOS is prepended when `add_bos_token` (tokenizer_config.json) is true; without that key,
  when the tokenizer's own post-processor adds a leading special token (e.g. `<s> $A`).
* EOS (`eos_token`, else the post-processor's trailing special token, e.g. ModernBERT's
  `[SEP]`) is appended to every document: it is the boundary between packed documents.
* `mask_id`: `mask_token` (encoders' MLM fill-in); bytes use 256, one past the bytes.

`hash` identifies what a token file was made with: the SHA-256 of the `tokenizer.json` bytes
and the framing (first 16 hex digits); bytes hash to `"bytes"`. The `tokenizers` library is
imported only for a real tokenizer (`pip install -e ".[hf]"`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np

BYTES = "bytes"
BYTE_MASK_ID = 256  # experiments/data/mlm.py's MASK_ID: one past the bytes
SENTINELS = ("\n", "a", ".")  # what a continuation is encoded after (`Tokenizer.encode`)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Text <-> int32 token ids, and how documents are framed (see the module docstring)."""

  spec: str
  hash: str
  vocab_size: int
  bos_id: int | None = None   # prepended to every document (None: no BOS)
  eos_id: int | None = None   # appended to every document (None: segment ids only)
  mask_id: int | None = None  # encoders' [MASK] (None: the tokenizer has none)
  backend: Any = dataclasses.field(default=None, compare=False, repr=False)

  @property
  def is_bytes(self) -> bool:
    return self.backend is None

  def encode(self, text: str, continuation: bool = False) -> np.ndarray:
    """Token ids `[N]` int32 of `text`, without special tokens.

    `continuation`: `text` follows other text inside a document, and gets the tokens it has
    there. Tokenizers that prepend a space to every text they encode (SentencePiece's dummy
    prefix: Llama 2, Mistral) would otherwise start each separately encoded piece with an
    extra space: the piece is encoded after a sentinel (`SENTINELS`: the first whose own
    tokens stay a prefix, i.e. that does not merge with the piece), whose tokens are then
    dropped; the piece alone if every sentinel merges. Bytes: the same either way.
    """
    if self.is_bytes:
      return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    ids = lambda t: self.backend.encode(t, add_special_tokens=False).ids
    for sentinel in SENTINELS if continuation else ():
      lead, both = ids(sentinel), ids(sentinel + text)
      if both[:len(lead)] == lead:
        return np.asarray(both[len(lead):], np.int32)
    return np.asarray(ids(text), np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`encode` of each text; a real tokenizer encodes the batch in parallel (Rust threads)."""
    if self.is_bytes:
      return [self.encode(t) for t in texts]
    batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
    return [np.asarray(e.ids, np.int32) for e in batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    """Text of `ids` (bytes: invalid UTF-8 replaced; special tokens are kept as text)."""
    ids = [int(t) for t in np.asarray(ids).reshape(-1)]
    if self.is_bytes:
      return bytes(t % 256 for t in ids).decode("utf-8", errors="replace")
    return self.backend.decode(ids, skip_special_tokens=False)

  @property
  def prefix(self) -> np.ndarray:
    """The tokens that open a document: `[BOS]` or nothing."""
    return np.asarray([] if self.bos_id is None else [self.bos_id], np.int32)

  @property
  def suffix(self) -> np.ndarray:
    """The tokens that close a document: `[EOS]` or nothing."""
    return np.asarray([] if self.eos_id is None else [self.eos_id], np.int32)

  def frame(self, ids: np.ndarray) -> np.ndarray:
    """One document as it is packed: prefix, `ids`, suffix."""
    return np.concatenate([self.prefix, np.asarray(ids, np.int32), self.suffix])

  def unframe(self, doc: np.ndarray) -> np.ndarray:
    """`frame`'s inverse: the document's own tokens."""
    return np.asarray(doc)[len(self.prefix):len(doc) - len(self.suffix)]

  def framing(self) -> dict[str, Any]:
    """What a token file's header records about this tokenizer."""
    return dict(tokenizer=self.spec, tokenizer_hash=self.hash, vocab_size=self.vocab_size,
                bos_id=self.bos_id, eos_id=self.eos_id)


def is_bytes(spec: str | None) -> bool:
  return spec in (None, "", BYTES)


@functools.lru_cache(maxsize=8)
def load(spec: str | None = BYTES) -> Tokenizer:
  """The tokenizer of `spec`: "bytes" / "" or a `tokenizer.json` file or its directory."""
  if is_bytes(spec):
    return Tokenizer(BYTES, BYTES, 256, mask_id=BYTE_MASK_ID)
  path = os.path.abspath(os.path.expanduser(spec))
  directory, file = (path, os.path.join(path, "tokenizer.json")) if os.path.isdir(path) else (
      os.path.dirname(path), path)
  if not os.path.isfile(file):
    raise ValueError(f"tokenizer {spec!r}: no {file}; give 'bytes', a tokenizer.json file or a "
                     f"directory holding one (a local Hugging Face snapshot).")
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"tokenizer {spec!r} needs the `tokenizers` library: "
                     f"pip install -e \".[hf]\".") from e
  backend = tokenizers.Tokenizer.from_file(file)
  settings = _settings(directory) if os.path.isdir(path) else {}
  bos_id, eos_id = _framing(backend, settings)
  with open(file, "rb") as f:
    digest = hashlib.sha256(f.read())
  digest.update(json.dumps([bos_id, eos_id]).encode())
  return Tokenizer(path, digest.hexdigest()[:16], backend.get_vocab_size(with_added_tokens=True),
                   bos_id, eos_id, _token_id(backend, settings.get("mask_token")), backend)


def _settings(directory: str) -> dict[str, Any]:
  """special_tokens_map.json overlaid by tokenizer_config.json (either may be missing)."""
  out = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      with open(path) as f:
        out.update({k: v for k, v in json.load(f).items() if v is not None})
  return out


def _token_id(backend, token) -> int | None:
  """Id of a special token given as a string or `{"content": ...}` (None if absent)."""
  if isinstance(token, dict):
    token = token.get("content")
  return None if not token else backend.token_to_id(token)


def _framing(backend, settings: dict[str, Any]) -> tuple[int | None, int | None]:
  """(BOS id or None, EOS id or None): tokenizer_config.json's `add_bos_token` and
  `eos_token`, else what the tokenizer's post-processor puts around a text."""
  plain = backend.encode("a", add_special_tokens=False).ids
  full = backend.encode("a", add_special_tokens=True).ids
  start = next((i for i in range(len(full)) if full[i:i + len(plain)] == plain), None)
  lead, trail = ([], []) if start is None else (full[:start], full[start + len(plain):])
  bos = _token_id(backend, settings.get("bos_token"))
  add_bos = settings.get("add_bos_token", bool(lead))
  bos_id = (bos if bos is not None else (lead[0] if lead else None)) if add_bos else None
  eos = _token_id(backend, settings.get("eos_token"))
  eos_id = eos if eos is not None else (trail[-1] if trail else None)
  if settings.get("add_bos_token") and bos_id is None:
    raise ValueError("tokenizer_config.json sets add_bos_token but names no bos_token the "
                     "tokenizer knows.")
  return bos_id, eos_id


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits, else uint32 (what token files store)."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
