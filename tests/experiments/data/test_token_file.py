"""Token files: tokenize -> read back -> decode equals the text; the `tokens` task's rows, held-out
documents and determinism; a file from another tokenizer refused; the command line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.data import token_file, tokenize_corpus, tokens
from experiments.data import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))
TEXTS = ["first file: def f(x):\n  return x\n", "zweite Datei: grüße, ünïcode ✓\n",
         "third " * 40]
LINES = [{"text": "a JSONL document", "id": 1}, {"text": "another one\nwith two lines"}]


def write_corpus(directory) -> list[str]:
  """Three text files and a JSONL file (a blank line included): the documents' texts in order."""
  os.makedirs(directory, exist_ok=True)
  for i, text in enumerate(TEXTS):
    with open(os.path.join(directory, f"{i}.txt"), "w", encoding="utf-8") as f:
      f.write(text)
  with open(os.path.join(directory, "3.jsonl"), "w") as f:
    f.write(json.dumps(LINES[0]) + "\n\n" + json.dumps(LINES[1]) + "\n")
  return TEXTS + [line["text"] for line in LINES]


@pytest.mark.parametrize("which", ["bpe", "bytes"])
def test_round_trip_tokenize_read_decode(bpe_dir, tmp_path, which):
  texts = write_corpus(tmp_path / "corpus")
  spec = bpe_dir if which == "bpe" else "bytes"
  summary = tokenize_corpus.tokenize(str(tmp_path / "corpus" / "*"), spec, str(tmp_path / "tok"),
                                     batch_bytes=40, progress=False)
  tok = tokenizer_lib.load(spec)
  tf = token_file.open_token_file(str(tmp_path / "tok"))
  assert tf.num_documents == len(texts) == summary["num_documents"]
  assert tf.tokens.dtype == np.uint16 and isinstance(tf.tokens, np.memmap)
  assert summary["num_tokens"] == len(tf.tokens) == tf.offsets[-1] and summary["mb_per_s"] > 0
  assert tf.header["tokenizer_hash"] == tok.hash
  for i, text in enumerate(texts):
    doc = tf.document(i)
    np.testing.assert_array_equal(doc, tok.frame(tok.encode(text)))
    assert tok.decode(tok.unframe(doc)) == text
  with pytest.raises(FileExistsError, match="--overwrite"):
    tokenize_corpus.tokenize(str(tmp_path / "corpus" / "*"), spec, str(tmp_path / "tok"))


def test_large_vocabularies_are_stored_as_uint32(tmp_path):
  assert tokenizer_lib.token_dtype(65536) == np.uint16
  big = tokenizer_lib.Tokenizer("big", "0123", 70000, eos_id=69999)
  docs = [np.array([5, 65536, 69999], np.int32), np.array([7, 69999], np.int32)]
  with token_file.TokenWriter(str(tmp_path), big) as writer:
    writer.add(docs)
  tf = token_file.open_token_file(str(tmp_path))
  assert tf.tokens.dtype == np.uint32 and tf.header["dtype"] == "uint32"
  np.testing.assert_array_equal(tf.document(0), docs[0])
  with pytest.raises(ValueError, match="token ids must be in"):
    token_file.TokenWriter(str(tmp_path / "x"), big).add([np.array([70000])])


@pytest.fixture(scope="module")
def bpe_tokens(bpe_dir, tmp_path_factory):
  """A token file of 12 documents of different lengths, made with the tiny BPE."""
  directory = tmp_path_factory.mktemp("tokens")
  for i in range(12):
    (directory / f"doc{i:02d}.txt").write_text(f"document {i} " + "words and more words " * i)
  out = str(directory / "file")
  tokenize_corpus.tokenize(str(directory / "*.txt"), bpe_dir, out, progress=False)
  return out


def test_tokens_task_rows_hold_out_documents(bpe_dir, bpe_tokens):
  task = tokens.Tokens(path=bpe_tokens, seq_len=16, tokenizer=bpe_dir, heldout_every=4)
  tf = task.file
  for heldout, docs in ((False, [i for i in range(12) if i % 4]), (True, [0, 4, 8])):
    stream = np.concatenate([tf.document(i) for i in docs])
    doc_of = np.concatenate([np.full(len(tf.document(i)), i) for i in docs])
    assert task.num_windows(heldout) == (len(stream) - 1) // 16
    for index in (0, 1, task.num_windows(heldout) - 1):
      row = task.window(index, heldout)
      lo = index * 16
      np.testing.assert_array_equal(row["tokens"], stream[lo:lo + 16])
      np.testing.assert_array_equal(row["targets"], stream[lo + 1:lo + 17])
      same = doc_of[lo + 1:lo + 17] == doc_of[lo:lo + 16]
      np.testing.assert_array_equal(row["loss_mask"], same)  # never across documents
      assert row["segment_ids"][0] == 0 and np.all(np.diff(row["segment_ids"]) >= 0)
  first, again = task.batch(5, 3), task.batch(5, 3)  # a pure function of (seed, step, salt)
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  assert not np.array_equal(task.batch(5, 3, salt=1)["tokens"], first["tokens"])
  assert task.batch(0, 2, salt=1, seq_len=32)["tokens"].shape == (2, 32)


def test_a_file_from_another_tokenizer_is_refused(bpe_dir, bpe_tokens):
  with pytest.raises(ValueError, match=r"(?s)hash \w{16}\).*hash bytes"):
    tokens.Tokens(path=bpe_tokens, seq_len=16, tokenizer="bytes")
  with pytest.raises(ValueError, match="not a token file"):
    tokens.Tokens(path=os.path.dirname(bpe_tokens), tokenizer=bpe_dir)
  with pytest.raises(ValueError, match="heldout_every"):
    tokens.Tokens(path=bpe_tokens, tokenizer=bpe_dir, heldout_every=1)


def test_tokenize_command(bpe_dir, tmp_path):
  write_corpus(tmp_path / "corpus")
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "x.jsonl").write_text('{"body": "no text field"}\n')
  run = lambda *args: subprocess.run(
      [sys.executable, "-m", "experiments.tokenize", *args], cwd=ROOT, capture_output=True,
      text=True, timeout=120, check=False, env=dict(os.environ, PYTHONPATH=ROOT))
  out = str(tmp_path / "out")
  done = run(f"--input={tmp_path}/corpus/*", f"--tokenizer={bpe_dir}", f"--output={out}",
             "--noprogress")
  assert done.returncode == 0, done.stderr
  assert "5 documents" in done.stdout and "MB/s" in done.stdout
  again = run(f"--input={tmp_path}/corpus/*", f"--output={out}")
  assert again.returncode == 1 and "--overwrite" in again.stderr
  bad = run(f"--input={tmp_path}/bad/*.jsonl", f"--output={tmp_path}/bad_out")
  assert bad.returncode == 1 and "x.jsonl:1" in bad.stderr and "'text'" in bad.stderr
  assert not os.listdir(tmp_path / "bad_out")  # nothing left behind
