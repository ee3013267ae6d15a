"""Tokenizers on the tasks: bytes unchanged bit for bit; a BPE's framing (BOS/EOS/mask as its
files define them), passkey/needle answers as tokens, real filler, text framed per file."""

import hashlib
import json
import os

import numpy as np
import pytest

from experiments.data import corpus, tasks
from experiments.data import tokenizer as tokenizer_lib
from tests.experiments import tiny_bpe

# sha256 of the batches below made by the tasks before tokenizers existed (bytes only).
BYTES_DIGEST = "2c9e7c07e9c25606be10a6b570b5cf995796786715e371ccaf664ac48108e4dd"


def test_bytes_is_the_default_and_unchanged_bit_for_bit(tmp_path):
  for i in range(5):
    (tmp_path / f"{i}.txt").write_text(f"document {i}: " + "lorem ipsum dolor sit amet " * (i + 3))
  digest = hashlib.sha256()
  for task in (tasks.Haystack(kind="passkey", seq_len=256, min_len=140, instruction=""),
               tasks.Haystack(kind="needle", seq_len=300),
               tasks.Text(seq_len=32, glob=str(tmp_path / "*.txt"), heldout_every=3)):
    assert task.tokenizer == "bytes"
    for salt in (0, 1):
      batch = task.batch(1, 3, salt=salt)
      for key in sorted(batch):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(batch[key]).tobytes())
  assert digest.hexdigest() == BYTES_DIGEST
  tok = tokenizer_lib.load("")
  assert (tok.hash, tok.vocab_size, tok.bos_id, tok.eos_id, tok.mask_id) == ("bytes", 256, None,
                                                                             None, 256)
  np.testing.assert_array_equal(tok.encode("héllo"), list("héllo".encode()))


def test_framing_comes_from_the_tokenizer_files(bpe_dir, tmp_path):
  tok = tokenizer_lib.load(bpe_dir)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.mask_id) == (384, 0, 1, 2)
  text = "def f(x):\n  return x * 2  # ünïcode\n"
  ids = tok.encode(text)
  assert tok.decode(ids) == text and ids.dtype == np.int32 and 0 not in ids
  np.testing.assert_array_equal(tok.frame(ids), [0, *ids, 1])
  np.testing.assert_array_equal(tok.unframe(tok.frame(ids)), ids)
  assert [len(x) for x in tok.encode_batch([text, "abc"])] == [len(ids), len(tok.encode("abc"))]
  # add_bos_token false: no BOS; a bare tokenizer.json file: no config, no post-processor.
  no_bos = tiny_bpe.train_bpe(tmp_path / "no_bos", config=dict(add_bos_token=False,
                                                               eos_token="</s>"))
  assert (tokenizer_lib.load(no_bos).bos_id, tokenizer_lib.load(no_bos).eos_id) == (None, 1)
  bare = tokenizer_lib.load(os.path.join(no_bos, "tokenizer.json"))
  assert (bare.bos_id, bare.eos_id, bare.mask_id) == (None, None, None)
  assert len({tok.hash, tokenizer_lib.load(no_bos).hash, bare.hash}) == 3


def test_framing_falls_back_to_the_post_processor(bpe_dir, tmp_path):
  """Without tokenizer_config.json, `<s> $A </s>` in tokenizer.json frames the documents."""
  from tokenizers import Tokenizer, processors  # pylint: disable=g-import-not-at-top
  backend = Tokenizer.from_file(os.path.join(bpe_dir, "tokenizer.json"))
  backend.post_processor = processors.TemplateProcessing(
      single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
  (tmp_path / "pp").mkdir()
  backend.save(str(tmp_path / "pp" / "tokenizer.json"))
  tok = tokenizer_lib.load(str(tmp_path / "pp"))
  assert (tok.bos_id, tok.eos_id) == (0, 1)
  with pytest.raises(ValueError, match="no .*tokenizer.json"):
    tokenizer_lib.load(str(tmp_path / "missing"))


@pytest.mark.parametrize("kind", ["passkey", "needle"])
def test_haystack_answer_is_the_tokenized_value(bpe_dir, kind):
  task = tasks.Haystack(kind=kind, seq_len=300, tokenizer=bpe_dir)
  tok = task.tok
  row, info = task.example(np.random.default_rng(3), 0.5)
  assert all(v.shape == (300,) for v in row.values()) and row["tokens"][0] == tok.bos_id
  answer = tok.encode(info["answer"], continuation=True)
  np.testing.assert_array_equal(row["tokens"][-len(answer):], answer)
  scored = row["loss_mask"] > 0
  np.testing.assert_array_equal(row["targets"][scored], answer)  # exactly the answer's tokens
  text = tok.decode(row["tokens"][1:])
  assert info["needle"] in text and text.endswith(info["answer"])
  assert task.min_length() < 300 and len(row["tokens"]) == 300


def test_pieces_inside_a_document_get_no_dummy_prefix(tmp_path):
  """A SentencePiece-style tokenizer prepends a space to each text it encodes; the needle,
  question, answer and filler are encoded as continuations: the row is the document's text."""
  tok_dir = tiny_bpe.train_bpe(tmp_path, dummy_prefix=True)
  tok = tokenizer_lib.load(tok_dir)
  pieces = lambda ids: [tok.backend.id_to_token(int(i)) for i in ids]
  assert pieces(tok.encode("\nThe"))[:2] == ["▁", "\n"]  # alone: the dummy prefix
  assert pieces(tok.encode("\nThe", continuation=True))[0] == "\n"
  task = tasks.Haystack(kind="needle", seq_len=300, tokenizer=tok_dir)
  row, info = task.example(np.random.default_rng(0), 0.5)
  text = tok.decode(row["tokens"][1:])
  assert f"\n{info['needle']}\n" in text and " \n" not in text
  assert text.endswith(f"number for {info['needle'].split()[-3]} is{info['answer']}")


def test_haystack_filler_from_a_corpus(bpe_dir, tmp_path):
  (tmp_path / "a.txt").write_text("Real text of a corpus, sentence after sentence. " * 40)
  task = tasks.Haystack(kind="needle", seq_len=200, tokenizer=bpe_dir, instruction="",
                        filler_source=str(tmp_path / "*.txt"))
  row, info = task.example(np.random.default_rng(0), 0.25)
  text = task.tok.decode(row["tokens"])
  assert text.count("sentence after sentence") >= 3 and "grass is green" not in text
  assert info["needle"] in text and len(row["tokens"]) == 200
  with pytest.raises(ValueError, match="fewer than"):
    tasks.Haystack(kind="needle", seq_len=20000, tokenizer=bpe_dir,
                   filler_source=str(tmp_path / "*.txt")).batch(0, 1, seq_len=20000, depth=0.5)


def test_text_task_frames_each_file(bpe_dir, tmp_path):
  texts = ["alpha beta gamma\n", "delta epsilon\n" * 3, "zeta\n"]
  for i, body in enumerate(texts):
    (tmp_path / f"{i}.txt").write_text(body)
  task = tasks.Text(seq_len=32, glob=str(tmp_path / "*.txt"), tokenizer=bpe_dir)
  data, ids = task.corpus()
  tok = task.tok
  for i, body in enumerate(texts):
    np.testing.assert_array_equal(data[ids == i], tok.frame(tok.encode(body)))
  window = task.window(0)
  assert window["tokens"][0] == tok.bos_id and window["tokens"].shape == (32,)
  cross = np.flatnonzero(np.diff(ids[:33]))  # the first document boundary inside the row
  assert window["loss_mask"][cross[0]] == 0 and window["segment_ids"][cross[0] + 1] == 1
  json.dumps(tok.framing())  # what a token file's header records is plain JSON
  assert corpus.load_tokens(str(tmp_path / "*.txt"), 1 << 20)[0].max() < 256  # bytes default
