"""Tokenizing a corpus into a token file: what `python -m experiments.tokenize` runs.

    summary = tokenize("corpus/**/*.jsonl", "/ckpt/llama", "/data/tok", text_field="text")
    summary["mb_per_s"]                      # input megabytes (1e6 bytes) per second

Input: the files matching a glob, in sorted order. A `.jsonl` file holds one document per line
(a JSON object whose `text_field` is the text; blank lines are skipped); any other file is one
document (UTF-8, invalid bytes replaced). The corpus is streamed: documents are gathered into
batches of about `batch_bytes` of input, each batch is encoded by the library's batch encoder
(`Tokenizer.encode_batch`: Rust threads for a real tokenizer), framed (BOS/EOS) and appended
to the token file (experiments/data/token_file.py), so memory holds one batch and the
documents' offsets, never the corpus. One document must fit in memory. A tqdm bar counts the
input bytes; the summary reports the throughput.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Iterator, Sequence

import tqdm

from experiments.data import corpus
from experiments.data import token_file
from experiments.data import tokenizer as tokenizer_lib


def iter_documents(files: Sequence[str], text_field: str = "text"
                   ) -> Iterator[tuple[str, int]]:
  """`(text, input bytes it used)` of every document of `files` (see the module docstring)."""
  for path in files:
    with open(path, "rb") as f:
      if not path.endswith(".jsonl"):
        data = f.read()
        yield data.decode("utf-8", errors="replace"), len(data)
        continue
      for number, line in enumerate(f, 1):
        if not line.strip():
          yield "", len(line)  # counted for the progress bar; empty texts are not written
          continue
        try:
          text = json.loads(line)[text_field]
        except (ValueError, KeyError, TypeError) as e:
          raise ValueError(f"{path}:{number}: not a JSON object with a string field "
                           f"{text_field!r} ({type(e).__name__}: {e}).") from e
        if not isinstance(text, str):
          raise ValueError(f"{path}:{number}: field {text_field!r} is a "
                           f"{type(text).__name__}, not a string.")
        yield text, len(line)


def batches(documents: Iterator[tuple[str, int]], batch_bytes: int
            ) -> Iterator[tuple[list[str], int]]:
  """`(texts, input bytes)` groups of about `batch_bytes` of input each (empty texts dropped)."""
  texts, size = [], 0
  for text, nbytes in documents:
    if text:
      texts.append(text)
    size += nbytes
    if size >= batch_bytes:
      yield texts, size
      texts, size = [], 0
  if texts or size:
    yield texts, size


def tokenize(pattern: str, tokenizer: str, output: str, *, text_field: str = "text",
             batch_bytes: int = 8 << 20, overwrite: bool = False, progress: bool = True
             ) -> dict[str, Any]:
  """Writes the token file of the files matching `pattern` to directory `output`.

  Returns the header plus `seconds` and `mb_per_s` (input 1e6 bytes per wall-clock second).
  Raises `ValueError` for no matching files or a bad JSONL line, `FileExistsError` for an
  existing token file (unless `overwrite`); nothing is left behind by a failed run.
  """
  files = corpus.matching_files(pattern)
  if not files:
    raise ValueError(f"tokenize: no files match {pattern!r}.")
  tok = tokenizer_lib.load(tokenizer)
  total = sum(os.path.getsize(f) for f in files)
  start = time.perf_counter()
  bar = tqdm.tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                  desc="tokenizing", dynamic_ncols=True)
  with token_file.TokenWriter(output, tok, overwrite=overwrite, sources=os.path.abspath(
      os.path.expanduser(pattern)), text_field=text_field, files=len(files)) as writer:
    for texts, size in batches(iter_documents(files, text_field), batch_bytes):
      writer.add([tok.frame(ids) for ids in tok.encode_batch(texts)], size)
      bar.update(size)
  bar.close()
  seconds = time.perf_counter() - start
  header = token_file.open_token_file(output).header
  return dict(header, seconds=seconds, mb_per_s=header["input_bytes"] / 1e6 / max(seconds, 1e-9))
