"""Offline long-context tasks: passkey, needle grid, MQAR, and a byte-level text corpus.

Every task turns `(seed, step)` into a batch, and nothing else: the data a run sees is a pure
function of the config's seed and the step, so a resumed run continues with the same data.
A batch is a dict of numpy arrays, all `[B, T]`:

* `tokens`      int32 inputs (bytes 0..255 for the text tasks),
* `targets`     int32 next tokens (`targets[t]` is what the model should predict at `t`),
* `loss_mask`   float32, 1 where `targets[t]` is scored (answers only for the recall tasks),
* `segment_ids` int32 document ids of packed rows (`-1` = padding, never attended or scored).

Formats:
* passkey (Mohtashami & Jaggi 2023; the PI and YaRN papers): an instruction line, filler
  ("The grass is green. ...") repeated, one line "The pass key is K. Remember it. K is the pass
  key." at a chosen depth of the filler, more filler, "What is the pass key? The pass key is";
  the scored answer is " K". Byte tokens, the whole sequence (prompt + answer) exactly `T` long.
* needle: the same haystack with a key/value needle ("The special magic number for KEY is V.")
  and the question "What is the special magic number for KEY? The special magic number for
  KEY is"; evaluated over a (context length x depth) grid.
* mqar (Zoology, arXiv 2312.04927, `multiquery_ar`): key/value pairs, then a query region in
  which keys reappear at power-law-distributed gaps; only the value after each query is scored.
* mlm: masked language modelling on the text files (experiments/data/mlm.py).
* text: files from a glob (default: the Python standard library's own sources, via
  `sysconfig`), concatenated as bytes and cut into rows; short files are packed together and
  told apart by segment ids.
* tokens: a token file larger than memory (experiments/data/tokens.py), read through
  `np.memmap`, packed as the text task packs files.

Tokenizers (`tokenizer=`, experiments/data/tokenizer.py): the text, passkey and needle tasks
encode with "bytes" (the default: UTF-8 bytes, exactly the tasks' original rows) or a local
`tokenizer.json`; a real tokenizer's documents start with its BOS when it adds one, the text
task's files end with its EOS (the boundary between packed documents), and the passkey/needle
answer is the tokenized value, scored by exact match of its tokens. Pieces inside a document
(needle, question, answer, repeated filler) are encoded as continuations
(`Tokenizer.encode(continuation=True)`: no SentencePiece dummy-prefix space of their own).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from experiments.data import corpus
from experiments.data import tokenizer as tokenizer_lib
from experiments.data.corpus import DEFAULT_TEXT_GLOB, decode, encode  # re-exported
from experiments.data.mlm import MLM, split_corpus
from experiments.data.tokens import Tokens, corpus_stream

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
               "memorize them. I will quiz you about the important information there.")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def _rng(seed: int, step: int, salt: int = 0) -> np.random.Generator:
  return np.random.default_rng([seed, step, salt])


def _lm_example(sequence: np.ndarray, answer_len: int) -> dict[str, np.ndarray]:
  """One row from a full sequence whose last `answer_len` tokens are the scored answer."""
  t = len(sequence)
  mask = np.zeros(t, np.float32)
  mask[t - answer_len - 1:t - 1] = 1.0  # positions whose next token is an answer token
  targets = np.concatenate([sequence[1:], [0]]).astype(np.int32)
  return dict(tokens=sequence.astype(np.int32), targets=targets, loss_mask=mask,
              segment_ids=np.zeros(t, np.int32))


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


# --- haystack tasks: passkey and needle ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Haystack:
  """A needle line hidden at a depth of filler text; the answer follows the final question.

  `instruction=""` drops the instruction line (more room for filler at short lengths).
  `min_len > 0` packs training rows with several documents of random lengths in
  `[min_len, seq_len]` (segment ids tell them apart; the unused tail is padding, id -1):
  more answers per row and a spread of needle distances. Evaluation rows (`seq_len=` or
  `depth=` given) always hold one document of exactly the requested length.
  `stretch=True` (the default) stretches a document that leaves less than `min_len` free to
  fill the row, so lengths between `seq_len - min_len` and `seq_len` never occur;
  `stretch=False` keeps every document's drawn length (uniform in `[min_len, free]`) and pads
  the rest, so the filler length spans the whole range `[min_len - fixed text, seq_len - fixed
  text]` (`min_length()` is the shortest document: the fixed text with no filler).
  `whole_rows` (with `min_len`): the share of training rows that hold one document as long as
  the row, its needle at a uniform depth, instead of packed ones (packed documents put few
  needles far back: the mix adds needle distances uniform up to `seq_len`).
  `tokenizer`: "bytes" or a local tokenizer.json (file or directory); a document starts with
  its BOS when the tokenizer adds one. `filler_source`: "" fills with `filler` repeated; a glob
  of text files or a token-file directory fills with a slice of that corpus's token stream at
  a random offset (real text: the needle-in-a-haystack evaluation).
  """

  seq_len: int = 512
  digits: int = 5
  instruction: str = INSTRUCTION
  filler: str = FILLER
  kind: str = "passkey"  # "passkey" or "needle"
  seed: int = 0
  key_letters: int = 4
  min_len: int = 0
  stretch: bool = True
  whole_rows: float = 0.0
  tokenizer: str = tokenizer_lib.BYTES
  filler_source: str = ""

  @property
  def tok(self) -> tokenizer_lib.Tokenizer:
    return tokenizer_lib.load(self.tokenizer)

  def head(self) -> np.ndarray:
    """The document's opening tokens: BOS (if the tokenizer adds one), the instruction line."""
    line = self.tok.encode(self.instruction + "\n") if self.instruction else np.zeros(0, np.int32)
    return np.concatenate([self.tok.prefix, line])

  def min_length(self) -> int:
    """Tokens of a document with no filler (instruction, needle, question, answer)."""
    needle, question, answer = self.parts(np.random.default_rng(0))
    return len(self.head()) + sum(len(self.tok.encode(t, continuation=True)) for t in
                                  ("\n" + needle + "\n", "\n" + question, answer))

  def parts(self, rng: np.random.Generator) -> tuple[str, str, str]:
    """(needle line, final question, answer) of one example."""
    value = str(rng.integers(10 ** (self.digits - 1), 10 ** self.digits))
    if self.kind == "passkey":
      return (f"The pass key is {value}. Remember it. {value} is the pass key.",
              "What is the pass key? The pass key is", f" {value}")
    key = "".join(chr(c) for c in rng.integers(ord("a"), ord("z") + 1, self.key_letters))
    return (f"The special magic number for {key} is {value}.",
            f"What is the special magic number for {key}? The special magic number for {key} is",
            f" {value}")

  def example(self, rng: np.random.Generator, depth: float, seq_len: int | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One row exactly `seq_len` tokens long, and its info (answer, needle position, depth)."""
    seq_len = seq_len or self.seq_len
    needle, question, answer = self.parts(rng)
    head, encode_text = self.head(), functools.partial(self.tok.encode, continuation=True)
    needle_t, question_t = encode_text("\n" + needle + "\n"), encode_text("\n" + question)
    answer_t = encode_text(answer)
    n_filler = seq_len - len(head) - len(needle_t) - len(question_t) - len(answer_t)
    if n_filler < 0:
      raise ValueError(f"{self.kind}: seq_len {seq_len} is too short for the fixed text "
                       f"({seq_len - n_filler} tokens); use a longer seq_len or instruction=''.")
    filler = self.filler_tokens(rng, n_filler)
    cut = int(round(float(depth) * n_filler))
    sequence = np.concatenate([head, filler[:cut], needle_t, filler[cut:], question_t, answer_t])
    info = dict(answer=answer, depth=float(depth), needle_start=len(head) + cut + 1,
                filler_start=len(head), filler_len=n_filler, needle=needle)
    return _lm_example(sequence, len(answer_t)), info

  def filler_tokens(self, rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` filler tokens: `filler` repeated (tokenized as one text), or (`filler_source`) a
    slice of that corpus's token stream at a random offset."""
    if self.filler_source:
      stream = corpus_stream(self.filler_source, self.tokenizer)
      if len(stream) < n:
        raise ValueError(f"{self.kind}: filler_source {self.filler_source!r} holds "
                         f"{len(stream)} tokens, fewer than the {n} filler tokens needed.")
      start = int(rng.integers(0, len(stream) - n + 1))
      return np.asarray(stream[start:start + n], np.int32)
    return repeated_filler(self.tokenizer, self.filler, n)

  def batch(self, step: int, batch_size: int, *, salt: int = 0, seq_len: int | None = None,
            depth: float | None = None) -> dict[str, np.ndarray]:
    """`batch_size` rows at random depths (or the given one): a pure function of (seed, step).

    `salt` selects an independent stream (0 = training, 1 = held-out evaluation, ...).
    """
    rng = _rng(self.seed, step, salt)
    if self.min_len and seq_len is None and depth is None:
      return _stack([self.example(rng, rng.uniform())[0]
                     if self.whole_rows and rng.uniform() < self.whole_rows
                     else self.packed_row(rng) for _ in range(batch_size)])
    rows = [self.example(rng, rng.uniform() if depth is None else depth, seq_len)[0]
            for _ in range(batch_size)]
    return _stack(rows)

  def packed_row(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Documents of random lengths in [min_len, seq_len] filling one row (`stretch`: the last
    one is stretched to the row's end; otherwise the tail is padding)."""
    docs, free = [], self.seq_len
    while free >= self.min_len:
      length = int(rng.integers(self.min_len, free + 1))
      if free - length < self.min_len and self.stretch:
        length = free  # no room for another document: this one fills the row
      doc = self.example(rng, rng.uniform(), length)[0]
      doc["segment_ids"][:] = len(docs)
      docs.append(doc)
      free -= length
    if free:
      docs.append(dict(tokens=np.zeros(free, np.int32), targets=np.zeros(free, np.int32),
                       loss_mask=np.zeros(free, np.float32),
                       segment_ids=np.full(free, -1, np.int32)))
    return {key: np.concatenate([doc[key] for doc in docs]) for key in docs[0]}


@functools.lru_cache(maxsize=16)
def repeated_filler(tokenizer: str, filler: str, n: int) -> np.ndarray:
  """The first `n` tokens of `filler` repeated, tokenized as one text (bytes: `n // len +
  1` copies, the original rows exactly; a subword tokenizer merges across the copies, so
  copies double until `n` tokens are there)."""
  tok = tokenizer_lib.load(tokenizer)
  repeats = n // max(len(tok.encode(filler)), 1) + 1
  tokens = tok.encode(filler * repeats, continuation=True)
  while len(tokens) < n:
    repeats *= 2
    tokens = tok.encode(filler * repeats, continuation=True)
  return tokens[:n]


# --- multi-query associative recall (Zoology) ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MQAR:
  """Zoology's `multiquery_ar`: keys in [1, V/2), values in [V/2, V); only answers are scored."""

  seq_len: int = 128
  num_kv_pairs: int = 8
  vocab_size: int = 256
  power_a: float = 0.01
  random_non_queries: bool = True
  seed: int = 0

  def example(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    t, n, v = self.seq_len, self.num_kv_pairs, self.vocab_size
    context = 2 * n
    space = (t - context) // 2
    if space < n or n > v // 2 - 1:
      raise ValueError(f"mqar: seq_len {t} / vocab_size {v} cannot hold {n} key-value pairs and "
                       f"their queries (need seq_len >= {4 * n}, vocab_size >= {2 * n + 2}).")
    keys = rng.choice(np.arange(1, v // 2), n, replace=False)
    values = rng.choice(np.arange(v // 2, v), n, replace=False)
    kvs = np.stack([keys, values], axis=1).reshape(-1)  # k1 v1 k2 v2 ...
    p = self.power_a * np.arange(1, space + 1) ** (self.power_a - 1)
    gaps = rng.choice(space, n, replace=False, p=p / p.sum())
    queries = np.zeros(t - context + 1, np.int64)
    queries[gaps * 2] = keys
    sequence = np.concatenate([kvs, queries])  # T + 1
    labels = np.full(t + 1, -1, np.int64)
    labels[context + gaps * 2 + 1] = values
    tokens, targets = sequence[:-1], labels[1:]
    if self.random_non_queries:
      zeros = tokens == 0
      tokens = np.where(zeros, rng.integers(0, v, t), tokens)
    mask = (targets >= 0).astype(np.float32)
    return dict(tokens=tokens.astype(np.int32), targets=np.maximum(targets, 0).astype(np.int32),
                loss_mask=mask, segment_ids=np.zeros(t, np.int32))

  def batch(self, step: int, batch_size: int, *, salt: int = 0) -> dict[str, np.ndarray]:
    rng = _rng(self.seed, step, salt)
    return _stack([self.example(rng) for _ in range(batch_size)])


# --- plain text from a glob ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Text:
  """LM on files matching `glob`, packed into rows of `seq_len` with segment ids.

  The corpus (files in sorted order; bytes, or `tokenizer`'s tokens with each file framed by
  its BOS/EOS) is one stream cut into `seq_len + 1` windows; each epoch visits the windows in
  a seed-dependent permutation. A row holds the ends and starts of several files when they
  are short; `segment_ids` separates them, and a token is scored only when its target lies in
  the same file. The corpus is held in memory (`max_bytes` of text at most); for more, make a
  token file (`python -m experiments.tokenize`) and train on the `tokens` task.
  """

  seq_len: int = 256
  glob: str = DEFAULT_TEXT_GLOB
  max_bytes: int = 64 << 20
  seed: int = 0
  heldout_every: int = 0  # > 0: file i (sorted) is held out iff i % heldout_every == 0
  tokenizer: str = tokenizer_lib.BYTES

  @property
  def tok(self) -> tokenizer_lib.Tokenizer:
    return tokenizer_lib.load(self.tokenizer)

  def corpus(self, heldout: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, file ids): all files, or (`heldout_every` > 0) the training / held-out ones."""
    if not self.heldout_every:
      return corpus.load_tokens(self.glob, self.max_bytes, self.tokenizer)
    return split_corpus(self.glob, self.max_bytes, self.heldout_every, heldout, self.tokenizer)

  def num_windows(self, heldout: bool = False, seq_len: int | None = None) -> int:
    seq_len = seq_len or self.seq_len
    n = (len(self.corpus(heldout)[0]) - 1) // seq_len
    if n < 1:
      raise ValueError(f"text: corpus {self.glob!r} is shorter than one row of {seq_len}.")
    return n

  def window(self, index: int, heldout: bool = False, seq_len: int | None = None
             ) -> dict[str, np.ndarray]:
    """Row `index` of the stream cut into rows of `seq_len` (default: the task's)."""
    seq_len = seq_len or self.seq_len
    data, ids = self.corpus(heldout)
    lo = index * seq_len
    return corpus.lm_window(data[lo:lo + seq_len + 1], ids[lo:lo + seq_len + 1])

  def batch(self, step: int, batch_size: int, *, salt: int = 0, seq_len: int | None = None
            ) -> dict[str, np.ndarray]:
    """Rows `step * B .. (step + 1) * B` of the epoch permutations (`salt` offsets the seed;
    with `heldout_every`, salt 0 reads the training files and any other salt the held-out
    ones). `seq_len` overrides the row length (evaluation at other lengths)."""
    heldout = bool(self.heldout_every) and salt != 0
    return corpus.epoch_rows(lambda index: self.window(index, heldout, seq_len),
                             self.num_windows(heldout, seq_len), self.seed + 7919 * salt, step,
                             batch_size)


# --- registry ------------------------------------------------------------------------------------

TASKS = {"passkey": Haystack, "needle": Haystack, "mqar": MQAR, "text": Text, "mlm": MLM,
         "tokens": Tokens}


def make_task(config, seed: int = 0):
  """The task of a `config.task` (a dict-like with `name` and the task's fields)."""
  fields = dict(config)
  name = fields.pop("name", None)
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}.")
  cls = TASKS[name]
  if cls is Haystack:
    fields["kind"] = name
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"task {name!r} has no fields {unknown}; known: {sorted(known - {'kind'})}.")
  return cls(**fields, seed=seed) if "seed" not in fields else cls(**fields)
