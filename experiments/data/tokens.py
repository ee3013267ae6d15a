"""The `tokens` task: language modelling on a token file larger than memory.

    python -m experiments.tokenize --input='corpus/*.txt' --tokenizer=/ckpt/llama --output=/data/tok
    task = Tokens(path="/data/tok", seq_len=8192, tokenizer="/ckpt/llama")
    batch = task.batch(step, 8)             # training documents; salt=1: held-out documents

The token file (experiments/data/token_file.py) is read through `np.memmap`: a batch reads only
its rows' tokens. Document `i` (in the file's order) is held out iff `i % heldout_every == 0`
(every 100th by default; 0 holds out nothing, and evaluation then reads the training
documents in another order). Each split is its documents' framed tokens (BOS, text, EOS)
concatenated and cut into rows as the text task cuts its files (experiments/data/corpus.py):
windows of `seq_len + 1` tokens every `seq_len`, visited in a seed-dependent permutation per
epoch, documents told apart by segment ids, a token scored only when its target is in the same
document. Batches are a pure function of (seed, step, salt), so a resumed run sees the same
data. Memory: O(documents) for the split's index, O(windows) for an epoch's order; the tokens
stay on disk.

A file made with another tokenizer than `tokenizer` is refused (`ValueError` naming both
hashes) when the task is made.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from experiments.data import corpus
from experiments.data import token_file
from experiments.data import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class Tokens:
  """Packed LM rows from a token file; see the module docstring."""

  path: str = ""
  seq_len: int = 1024
  tokenizer: str = tokenizer_lib.BYTES
  heldout_every: int = 100  # document i is held out iff i % heldout_every == 0 (0: none)
  seed: int = 0

  def __post_init__(self):
    if not self.path:
      raise ValueError("tokens: task.path must name a token file directory (made by "
                       "`python -m experiments.tokenize`).")
    if self.heldout_every < 0 or self.heldout_every == 1:
      raise ValueError(f"tokens: heldout_every must be 0 (none held out) or >= 2, got "
                       f"{self.heldout_every}.")
    self.file.check_tokenizer(self.tok)

  @property
  def file(self) -> token_file.TokenFile:
    return token_file.open_token_file(self.path)

  @property
  def tok(self) -> tokenizer_lib.Tokenizer:
    return tokenizer_lib.load(self.tokenizer)

  def split(self, heldout: bool) -> tuple[np.ndarray, np.ndarray]:
    """(document indices [K], their starts in the split's stream [K + 1]) of the training
    (`heldout=False`) or held-out documents."""
    return split_documents(self.file, self.heldout_every, heldout and self.heldout_every > 0)

  def num_windows(self, heldout: bool = False, seq_len: int | None = None) -> int:
    seq_len = seq_len or self.seq_len
    n = (int(self.split(heldout)[1][-1]) - 1) // seq_len
    if n < 1:
      raise ValueError(f"tokens: the {'held-out' if heldout else 'training'} documents of "
                       f"{self.path} hold fewer than {seq_len + 1} tokens.")
    return n

  def window(self, index: int, heldout: bool = False, seq_len: int | None = None
             ) -> dict[str, np.ndarray]:
    """Row `index` of the split's stream cut into rows of `seq_len` (default: the task's).
    Reads only the row's tokens; O(seq_len + documents in the row)."""
    seq_len = seq_len or self.seq_len
    docs, starts = self.split(heldout)
    lo, hi = index * seq_len, index * seq_len + seq_len + 1
    first = int(np.searchsorted(starts, lo, side="right")) - 1
    last = int(np.searchsorted(starts, hi, side="left"))  # documents first .. last - 1
    offsets, tokens = self.file.offsets, self.file.tokens
    chunks, ids = [], []
    for k in range(first, last):
      a, b = max(lo, starts[k]) - starts[k], min(hi, starts[k + 1]) - starts[k]
      if b > a:
        begin = int(offsets[docs[k]])
        chunks.append(np.asarray(tokens[begin + a:begin + b], np.int32))
        ids.append(np.full(b - a, k, np.int64))
    return corpus.lm_window(np.concatenate(chunks), np.concatenate(ids))

  def batch(self, step: int, batch_size: int, *, salt: int = 0, seq_len: int | None = None
            ) -> dict[str, np.ndarray]:
    """Rows `step * B .. (step + 1) * B` of the epoch permutations of the training documents'
    rows (`salt` 0) or the held-out ones' (any other salt; `salt` also offsets the order's
    seed). `seq_len` overrides the row length (evaluation at other lengths)."""
    heldout = salt != 0
    return corpus.epoch_rows(lambda index: self.window(index, heldout, seq_len),
                             self.num_windows(heldout, seq_len), self.seed + 7919 * salt, step,
                             batch_size)


@functools.lru_cache(maxsize=8)
def split_documents(tf: token_file.TokenFile, heldout_every: int, heldout: bool
                    ) -> tuple[np.ndarray, np.ndarray]:
  """`Tokens.split` of an opened token file."""
  offsets, path = tf.offsets, tf.path
  docs = np.arange(len(offsets) - 1, dtype=np.int64)
  if heldout_every:
    docs = docs[(docs % heldout_every == 0) == heldout]
  if not len(docs):
    raise ValueError(f"tokens: {path} has no {'held-out' if heldout else 'training'} "
                     f"documents with heldout_every={heldout_every} ({len(offsets) - 1} "
                     f"documents).")
  lengths = np.asarray(offsets[docs + 1] - offsets[docs], np.int64)
  return docs, np.concatenate([[0], np.cumsum(lengths)])


def corpus_stream(source: str, tokenizer: str = tokenizer_lib.BYTES,
                  max_bytes: int = 64 << 20) -> np.ndarray:
  """All tokens `[N]` of a corpus as training reads it (documents framed by the tokenizer):
  a token-file directory (memory-mapped; its tokenizer must be `tokenizer`) or a glob of text
  files (at most `max_bytes` of text, tokenized in memory)."""
  if token_file.is_token_file(source):
    tf = token_file.open_token_file(source)
    tf.check_tokenizer(tokenizer_lib.load(tokenizer))
    return tf.tokens
  return corpus.load_tokens(os.path.expanduser(source), max_bytes, tokenizer)[0]
