"""Masked language modelling (ModernBERT's objective) on bytes, and its needle retrieval probe.

    task = MLM(seq_len=256)
    batch = task.batch(step, 16)            # training files; salt=1: held-out files
    rows = task.needle_batch(0, 8, seq_len=256, distance=(64, 128))   # retrieval probe

The text is `corpus.load_corpus` (default: the Python standard library's `*.py`, sorted); file
number `i` (in sorted order) is held out for evaluation when `i % heldout_every == 0` (every
10th file by default: `abc.py`, `bdb.py`, ... whichever land on a multiple of 10), the others
are training files. Each stream is its files concatenated and cut into rows of `seq_len`; a
row packs the end of one file with the start of the next, told apart by `segment_ids`
(unpadded packing with document masking, as ModernBERT trains); a short final row is padded
(segment id -1, never attended or scored).

Batches follow experiments/data/tasks.py's contract (`[B, T]` arrays, a pure function of
(seed, step, salt)) with MLM meanings:

* `tokens`: the corrupted input. Each non-padding position is selected with probability
  `mask_rate` (ModernBERT: 0.3); a selected position becomes `MASK_ID` with probability 0.8,
  a uniformly random byte with 0.1, and stays itself with 0.1.
* `targets`: the original bytes; `loss_mask`: 1 exactly at the selected positions. The
  trainer's loss and accuracy (experiments/training/trainer.py) are then the MLM loss and the
  masked-token accuracy: unselected and padding positions weigh 0.

Needles (`needle_rate`): a fraction of the training rows (never the held-out rows) gets up to
`needles_per_row` key-value pairs, each a line `\nneedle_KEY = VALUE\n` (distinct KEYs in a
row) written over its longest document twice, at a random distance, on bytes no other needle
line uses; in one copy (random: before or after the other) every digit of VALUE (or a random
`masked_digits` of them) is replaced by `MASK_ID` and scored, so the model learns to retrieve a
value from its key anywhere in the document, in either direction (their loss weight is
`needle_weight`, default 1: a masked byte like any other). Several pairs per row make it match
keys (one pair could be found as "the other needle line"). Needle lines are exempt from the
random masking: their only corruption is the forced masked value, so the visible copy is always
intact (were it masked at 30% like the text, all four digits would survive in only ~0.7^4 = 24%
of the pairs, and most retrieval targets would be unanswerable), as in `needle_batch`'s
evaluation rows. `needle_batch` makes the evaluation rows: one document of held-out text, one
pair at a distance (line start to line start; equally key to key and value to value) drawn from
a given range, only the masked value scored; the trainer's exact match is then "all digits
right".
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from experiments.data import corpus

MASK_ID = 256  # the [MASK] token: one past the bytes, so an MLM model has vocab_size >= 257
PAD_SEGMENT = -1


@functools.lru_cache(maxsize=8)
def split_corpus(pattern: str, max_bytes: int, heldout_every: int, heldout: bool,
                 tokenizer: str = "bytes") -> tuple[np.ndarray, np.ndarray]:
  """(tokens [N], file id [N]) of the training (`heldout=False`) or held-out files: file `i`
  (sorted order) is held out iff `i % heldout_every == 0` (`corpus.load_tokens`: bytes, or
  `tokenizer`'s framed tokens)."""
  data, ids = corpus.load_tokens(pattern, max_bytes, tokenizer)
  keep = (ids % heldout_every == 0) == heldout
  if not keep.any():
    raise ValueError(f"mlm: no {'held-out' if heldout else 'training'} files in {pattern!r} "
                     f"with heldout_every={heldout_every} ({ids.max() + 1} files); use more "
                     f"files or another heldout_every.")
  return data[keep], ids[keep]


def mask_tokens(rng: np.random.Generator, tokens: np.ndarray, valid: np.ndarray,
                rate: float) -> tuple[np.ndarray, np.ndarray]:
  """(corrupted tokens, selected float mask) of `tokens [T]`: BERT's 80/10/10 on `rate` of the
  `valid` positions (mask / random byte / unchanged). O(T)."""
  selected = (rng.random(tokens.shape) < rate) & valid
  action = rng.random(tokens.shape)
  corrupted = np.where(selected & (action < 0.8), MASK_ID, tokens)
  random_bytes = rng.integers(0, 256, tokens.shape)
  corrupted = np.where(selected & (action >= 0.8) & (action < 0.9), random_bytes, corrupted)
  return corrupted.astype(np.int32), selected.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class MLM:
  """Byte-level masked language modelling on packed files; see the module docstring."""

  seq_len: int = 256
  glob: str = corpus.DEFAULT_TEXT_GLOB
  max_bytes: int = 64 << 20
  mask_rate: float = 0.3
  heldout_every: int = 10
  needle_rate: float = 0.5
  digits: int = 4
  key_letters: int = 4
  needle_weight: float = 1.0
  needles_per_row: int = 1
  masked_digits: int = 0  # how many of the masked copy's digits are masked (0: all)
  seed: int = 0

  def __post_init__(self):
    if not 0.0 < self.mask_rate < 1.0:
      raise ValueError(f"mlm: mask_rate must be in (0, 1), got {self.mask_rate}.")
    if not 0.0 <= self.needle_rate <= 1.0:
      raise ValueError(f"mlm: needle_rate must be in [0, 1], got {self.needle_rate}.")
    if not self.needle_weight > 0:
      raise ValueError(f"mlm: needle_weight must be > 0, got {self.needle_weight}.")
    if not 0 <= self.masked_digits <= self.digits:
      raise ValueError(f"mlm: masked_digits must be in [0, digits={self.digits}], got "
                       f"{self.masked_digits}.")
    if self.needles_per_row < 1:
      raise ValueError(f"mlm: needles_per_row must be >= 1, got {self.needles_per_row}.")
    if self.heldout_every < 2:
      raise ValueError(f"mlm: heldout_every must be >= 2, got {self.heldout_every}.")
    if self.seq_len < 3 * self.needle_len:
      raise ValueError(f"mlm: seq_len {self.seq_len} is too short for two needle lines of "
                       f"{self.needle_len} bytes; use seq_len >= {3 * self.needle_len}.")

  @property
  def needle_len(self) -> int:
    return len(self.needle_line("a" * self.key_letters, "0" * self.digits))

  @staticmethod
  def needle_line(key: str, value: str) -> str:
    return f"\nneedle_{key} = {value}\n"

  def stream(self, heldout: bool) -> tuple[np.ndarray, np.ndarray]:
    return split_corpus(self.glob, self.max_bytes, self.heldout_every, heldout)

  def row(self, heldout: bool, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(bytes [T], segment ids [T]) of row `index` of a stream; the tail row is padded."""
    data, ids = self.stream(heldout)
    lo = index * self.seq_len
    chunk, doc = data[lo:lo + self.seq_len], ids[lo:lo + self.seq_len]
    _, segments = np.unique(doc, return_inverse=True)
    pad = self.seq_len - len(chunk)
    return (np.pad(chunk, (0, pad)).astype(np.int32),
            np.pad(segments.reshape(-1), (0, pad), constant_values=PAD_SEGMENT).astype(np.int32))

  def num_rows(self, heldout: bool) -> int:
    return -(-len(self.stream(heldout)[0]) // self.seq_len)

  def batch(self, step: int, batch_size: int, *, salt: int = 0) -> dict[str, np.ndarray]:
    """Rows `step * B ..` of the training files (`salt=0`) or the held-out files (else), in a
    seed-dependent order per epoch, masked; training rows carry needles (`needle_rate`),
    held-out rows do not (their accuracy is plain masked-token accuracy)."""
    heldout = salt != 0
    n = self.num_rows(heldout)
    rng = np.random.default_rng([self.seed, step, salt])
    rows = []
    for i in range(step * batch_size, (step + 1) * batch_size):
      epoch, offset = divmod(i, n)
      order = corpus.epoch_order(self.seed + 7919 * salt, epoch, n)
      tokens, segments = self.row(heldout, int(order[offset]))
      rows.append(self.masked_row(rng, tokens, segments, needles=not heldout))
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}

  def masked_row(self, rng: np.random.Generator, tokens: np.ndarray, segments: np.ndarray,
                 needles: bool = True) -> dict[str, np.ndarray]:
    """A row: (training rows, with probability `needle_rate`) up to `needles_per_row` needle
    pairs in its longest document, then MLM masking of everything but the needle lines. O(T)."""
    forced = np.zeros(len(tokens), bool)  # the masked copies' value digits
    lines = np.zeros(len(tokens), bool)  # every needle line: exempt from random corruption
    if needles and rng.random() < self.needle_rate:
      ids, counts = np.unique(segments[segments >= 0], return_counts=True)
      longest = ids[np.argmax(counts)]
      start, length = int(np.flatnonzero(segments == longest)[0]), int(counts.max())
      if length >= 3 * self.needle_len:
        tokens, forced, lines = self.place_needles(rng, tokens, start, length)
    corrupted, selected = mask_tokens(rng, tokens, (segments >= 0) & ~lines, self.mask_rate)
    corrupted = np.where(forced, MASK_ID, corrupted)
    return dict(tokens=corrupted, targets=tokens.astype(np.int32),
                loss_mask=np.where(forced, self.needle_weight, selected).astype(np.float32),
                segment_ids=segments.astype(np.int32))

  def place_needles(self, rng: np.random.Generator, tokens: np.ndarray, start: int, length: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to `needles_per_row` pairs with distinct keys in `tokens[start:start + length]`, each
    at a distance uniform in [needle_len, length - needle_len] and on free bytes (a pair that
    finds no room in 8 draws is dropped). Returns (tokens, forced digits, needle lines)."""
    n = self.needle_len
    forced, lines = np.zeros(len(tokens), bool), np.zeros(len(tokens), bool)
    keys = set()
    for _ in range(self.needles_per_row):
      for _ in range(8):
        distance = int(rng.integers(n, length - n + 1))
        first = start + int(rng.integers(0, length - n - distance + 1))
        spans = (slice(first, first + n), slice(first + distance, first + distance + n))
        if not any(lines[s].any() for s in spans):
          break
      else:
        continue
      key = self.random_key(rng, exclude=keys)
      keys.add(key)
      tokens, masked = self.place_needle(rng, tokens, start, length, distance, first=first,
                                         key=key)
      forced |= masked
      for s in spans:
        lines[s] = True
    return tokens, forced, lines

  def random_key(self, rng: np.random.Generator, exclude=frozenset()) -> str:
    """`key_letters` random lowercase letters, not one of `exclude`."""
    while True:
      key = "".join(chr(c) for c in rng.integers(ord("a"), ord("z") + 1, self.key_letters))
      if key not in exclude:
        return key

  def place_needle(self, rng: np.random.Generator, tokens: np.ndarray, start: int, length: int,
                   distance: int, first: int | None = None, key: str | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Writes two copies of a random needle line into `tokens[start:start + length]`, line
    starts `distance` apart (the first at `first`, default random); returns (tokens, bool mask
    of the masked copy's hidden value digits: all, or `masked_digits` at random). The masked
    copy is the earlier or the later one with equal probability."""
    n = self.needle_len
    if not n <= distance <= length - n:
      raise ValueError(f"mlm: needle distance {distance} must be in [{n}, {length - n}] for a "
                       f"document of {length} tokens.")
    key = self.random_key(rng) if key is None else key
    value = str(rng.integers(10 ** (self.digits - 1), 10 ** self.digits))
    line = corpus.encode(self.needle_line(key, value))
    if first is None:
      first = start + int(rng.integers(0, length - n - distance + 1))
    tokens = tokens.copy()
    for at in (first, first + distance):
      tokens[at:at + n] = line
    masked_at = first if rng.random() < 0.5 else first + distance
    forced = np.zeros(len(tokens), bool)
    value_at = masked_at + n - 1 - self.digits  # the line ends with VALUE + "\n"
    hidden = rng.choice(self.digits, self.masked_digits or self.digits, replace=False)
    forced[value_at + hidden] = True
    return tokens, forced

  def needle_batch(self, step: int, batch_size: int, *, seq_len: int,
                   distance: tuple[int, int], salt: int = 2) -> dict[str, np.ndarray]:
    """Retrieval probe: `batch_size` rows of `seq_len` held-out bytes (one document each), a
    needle pair at a distance uniform in `[distance[0], distance[1])`, only the masked copy's
    value scored (no other masking). Pure function of (seed, step, salt, seq_len, distance)."""
    lo, hi = distance
    n = self.needle_len
    if not n <= lo < hi <= seq_len - n + 1:
      raise ValueError(f"mlm: needle distances [{lo}, {hi}) must lie in [{n}, {seq_len - n + 1}) "
                       f"at seq_len {seq_len}.")
    rng = np.random.default_rng([self.seed, step, salt, seq_len, lo])
    data, _ = self.stream(heldout=True)
    rows = []
    for _ in range(batch_size):
      at = int(rng.integers(0, len(data) - seq_len))
      text = data[at:at + seq_len].astype(np.int32)
      tokens, forced = self.place_needle(rng, text, 0, seq_len, int(rng.integers(lo, hi)))
      rows.append(dict(tokens=np.where(forced, MASK_ID, tokens).astype(np.int32),
                       targets=tokens.astype(np.int32), loss_mask=forced.astype(np.float32),
                       segment_ids=np.zeros(seq_len, np.int32)))
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def distance_buckets(seq_len: int, needle_len: int) -> list[tuple[int, int]]:
  """Needle distance ranges `[lo, hi)` cut at the powers of two, from one needle line apart to
  the longest distance `seq_len` holds: 256 (needle 20) -> [20, 32) [32, 64) [64, 128)
  [128, 237)."""
  top = seq_len - needle_len + 1
  powers = [2 ** k for k in range(1, 32) if needle_len < 2 ** k < top]
  edges = [needle_len, *powers, top]
  return list(zip(edges[:-1], edges[1:]))
