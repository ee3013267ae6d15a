"""Needle in a haystack of real text (`niah`): generated answers over (context length x depth).

    rows = niah_grid(model, config, "niah", lengths=[1024, 2048], depths=[0.0, 0.5, 1.0],
                     examples=8, batch_size=8)     # one row per (length, depth), as scores.grid

The haystack is real text: a slice of the corpus's token stream at a random offset
(`eval.filler`: a glob of text files or a token-file directory; by default the training
corpus, `task.path` or `task.glob`, else the Python standard library), tokenized with the
run's `task.tokenizer`. One needle line "The special magic number for KEY is VALUE." sits at
the requested depth of it (`tasks.Haystack`, kind "needle": a random KEY of letters and a
random VALUE of `digits` digits); the document ends with the question "What is the special
magic number for KEY? The special magic number for KEY is" and is scored by exact match of
the answer's tokens (" VALUE", tokenized):

* decoders (`model.causal`): the greedy continuation of the prompt, decoded with the KV cache
  (`models.generate`), one call per group of rows whose answers have the same token count;
* bidirectional encoders (ModernBERT-style, `causal=False`): the answer tokens are replaced by
  the tokenizer's mask token and the argmax at each masked position is the answer (MLM
  fill-in; the whole row, question included, is visible).

Prompts are held-out draws (RNG salt 2), a pure function of (seed, length, depth).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from flax import nnx
import jax.numpy as jnp
import ml_collections
import numpy as np

import models
from experiments.data import corpus
from experiments.data import tasks
from experiments.data import tokenizer as tokenizer_lib
from experiments.evaluation import scores


def filler_source(config: ml_collections.ConfigDict) -> str:
  """`eval.filler`, else the training corpus (`task.path`, `task.glob`), else the stdlib."""
  chosen = config.eval.get("filler", "")
  task = config.task
  return chosen or task.get("path", "") or task.get("glob", "") or corpus.DEFAULT_TEXT_GLOB


def niah_task(config: ml_collections.ConfigDict) -> tasks.Haystack:
  """The needle task on real filler, with the run's tokenizer and text settings."""
  return dataclasses.replace(scores.haystack(config, "needle"), filler_source=filler_source(config))


def generate_answers(model, rows: np.ndarray, answer_len: int, tok: tokenizer_lib.Tokenizer
                     ) -> np.ndarray:
  """Decoders: the `answer_len` greedy tokens after each row's prompt (`rows [B, T]` end with
  the answer; the prompt is the rest), decoded with the KV cache. Returns `[B, answer_len]`."""
  del tok
  out = models.generate(model, jnp.asarray(rows[:, :-answer_len]), answer_len)
  return np.asarray(out[:, -answer_len:])


@nnx.jit
def _argmax(model, tokens):
  logits, _ = model(tokens)
  return jnp.argmax(logits, axis=-1)


def fill_answers(model, rows: np.ndarray, answer_len: int, tok: tokenizer_lib.Tokenizer
                 ) -> np.ndarray:
  """Encoders: the argmax at the last `answer_len` positions of `rows [B, T]` once they hold
  the tokenizer's mask token (MLM fill-in). Returns `[B, answer_len]`."""
  if tok.mask_id is None:
    raise ValueError(f"niah on an encoder needs a mask token; tokenizer {tok.spec!r} names "
                     f"none (mask_token in tokenizer_config.json).")
  masked = np.array(rows, np.int32)
  masked[:, -answer_len:] = tok.mask_id
  return np.asarray(_argmax(model, jnp.asarray(masked)))[:, -answer_len:]


def score_rows(model, batch: dict[str, np.ndarray], tok: tokenizer_lib.Tokenizer
               ) -> tuple[int, int, int]:
  """(rows all right, answer tokens right, answer tokens) of one batch of needle rows."""
  answer = generate_answers if model.config.causal else fill_answers
  lengths = batch["loss_mask"].sum(axis=1).astype(int)
  exact = correct = total = 0
  for answer_len in np.unique(lengths):
    rows = batch["tokens"][lengths == answer_len]
    hit = answer(model, rows, int(answer_len), tok) == rows[:, -answer_len:]
    exact, correct, total = exact + int(hit.all(axis=1).sum()), correct + int(hit.sum()), (
        total + hit.size)
  return exact, correct, total


def niah_grid(model, config: ml_collections.ConfigDict, name: str, lengths: Sequence[int],
              depths: Sequence[float], examples: int, batch_size: int) -> list[dict[str, Any]]:
  """One row per (length, depth): exact match (`accuracy`) and answer-token accuracy of the
  generated (decoders) or filled-in (encoders) answers; see the module docstring."""
  task = niah_task(config)
  if task.tok.vocab_size > model.config.vocab_size:
    raise ValueError(f"niah: tokenizer {task.tokenizer!r} has {task.tok.vocab_size} tokens, "
                     f"more than the model's vocab_size {model.config.vocab_size}.")
  rows = []
  for length in lengths:
    for depth in depths:
      exact = correct = total = 0
      for i in range(-(-examples // batch_size)):
        batch = task.batch(i, min(batch_size, examples - i * batch_size), seq_len=length,
                           depth=depth, salt=2)
        counts = score_rows(model, batch, task.tok)
        exact, correct, total = exact + counts[0], correct + counts[1], total + counts[2]
      rows.append(dict(task=name, length=int(length), depth=float(depth), examples=examples,
                       accuracy=exact / examples, token_accuracy=correct / max(total, 1)))
  return rows
