"""Task generators: exact lengths, answers where they should be, determinism by (seed, step)."""

import os

import numpy as np
import pytest

from experiments.data import tasks


@pytest.mark.parametrize("kind", ["passkey", "needle"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("seq_len", [400, 533])
def test_haystack_answer_in_prompt_at_depth(kind, depth, seq_len):
  task = tasks.Haystack(seq_len=seq_len, kind=kind)
  row, info = task.example(np.random.default_rng(1), depth)
  assert all(row[k].shape == (seq_len,) for k in row)
  text = tasks.decode(row["tokens"])
  answer = info["answer"]
  # The scored targets are exactly the answer, at the end of the sequence.
  assert tasks.decode(row["targets"][row["loss_mask"] > 0]) == answer
  assert text.endswith(answer)
  prompt = text[:-len(answer)]
  assert prompt.endswith("is")
  # The answer appears in the prompt, inside the needle line, at the requested depth.
  needle_at = prompt.index(info["needle"])
  assert needle_at == info["needle_start"]
  assert answer.strip() in info["needle"]
  relative = (needle_at - 1 - info["filler_start"]) / info["filler_len"]
  assert abs(relative - depth) <= 1 / info["filler_len"]
  if kind == "passkey":
    assert prompt.startswith(tasks.INSTRUCTION)
    assert f"The pass key is {answer.strip()}. Remember it." in prompt
    assert prompt.endswith("What is the pass key? The pass key is")
    assert "The grass is green. The sky is blue." in prompt


def test_haystack_is_a_pure_function_of_seed_and_step():
  task = tasks.Haystack(seq_len=300, seed=3)
  a, b, c = task.batch(5, 4), task.batch(5, 4), task.batch(6, 4)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert not np.array_equal(a["tokens"], c["tokens"])
  assert not np.array_equal(a["tokens"], task.batch(5, 4, salt=1)["tokens"])


def test_haystack_too_short_is_a_clear_error():
  with pytest.raises(ValueError, match="too short"):
    tasks.Haystack(seq_len=64).example(np.random.default_rng(0), 0.5)


def _doc_lengths(batch) -> list[int]:
  """Lengths of the documents (segment ids >= 0) of every row of a packed batch."""
  lengths = []
  for ids in batch["segment_ids"]:
    lengths += np.bincount(ids[ids >= 0]).tolist()
  return lengths


@pytest.mark.parametrize("stretch", [True, False])
def test_packed_rows_document_lengths(stretch):
  """Packed rows: every document is in [min_len, seq_len] and ends in its scored answer;
  stretching leaves a gap of lengths (seq_len - min_len, seq_len), `stretch=False` fills it."""
  task = tasks.Haystack(seq_len=256, instruction="", min_len=104, stretch=stretch)
  assert task.min_length() == 104  # 5 digits, no instruction: the fixed text alone
  batch = task.batch(0, 64)
  assert batch["tokens"].shape == (64, 256)
  lengths = np.array(_doc_lengths(batch))
  assert lengths.min() >= 104 and lengths.max() <= 256
  assert batch["loss_mask"].sum() == 6 * len(lengths)  # " K": 6 scored tokens per document
  gap = (lengths > 256 - 104) & (lengths < 256)
  if stretch:
    assert not gap.any() and (batch["segment_ids"] >= 0).all()
  else:  # lengths spread over the whole range, in every third of it; the tail is padding
    assert all(((lengths >= lo) & (lengths < lo + 51)).any() for lo in (104, 155, 206))
    assert (batch["segment_ids"] == -1).any()


def test_whole_rows_mix_full_length_documents_into_packed_rows():
  """`whole_rows=0.5`: about half the rows are one document filling the row (needle anywhere
  in it), the others packed as without it; 0 leaves the packed stream unchanged."""
  packed = tasks.Haystack(seq_len=512, instruction="", min_len=104, stretch=False)
  np.testing.assert_array_equal(packed.batch(3, 8)["tokens"],
                                tasks.Haystack(seq_len=512, instruction="", min_len=104,
                                               stretch=False, whole_rows=0.0).batch(3, 8)["tokens"])
  batch = tasks.Haystack(seq_len=512, instruction="", min_len=104, stretch=False,
                         whole_rows=0.5).batch(0, 64)
  whole = (batch["segment_ids"] == 0).all(axis=1)
  assert 16 <= whole.sum() <= 48 and (batch["loss_mask"][whole].sum(axis=1) == 6).all()
  assert (batch["segment_ids"][~whole] != 0).any(axis=1).all()  # packed: several or padding


def test_mqar_labels_only_on_answers():
  task = tasks.MQAR(seq_len=128, num_kv_pairs=8, vocab_size=256, seed=2)
  batch = task.batch(0, 16)
  assert batch["tokens"].shape == batch["targets"].shape == (16, 128)
  for tokens, targets, mask in zip(batch["tokens"], batch["targets"], batch["loss_mask"]):
    pairs = dict(zip(tokens[0:16:2], tokens[1:16:2]))  # the key -> value context
    assert len(pairs) == len(set(pairs.values())) == 8  # keys unique, values unique
    scored = np.flatnonzero(mask)
    assert len(scored) == 8 and scored.min() >= 16  # one query per key, all after the context
    for t in scored:
      assert tokens[t] in pairs and targets[t] == pairs[tokens[t]]
      assert 128 <= targets[t] < 256 and 1 <= tokens[t] < 128
  np.testing.assert_array_equal(task.batch(0, 16)["tokens"], batch["tokens"])


def test_mqar_impossible_sizes_are_clear_errors():
  with pytest.raises(ValueError, match="cannot hold"):
    tasks.MQAR(seq_len=32, num_kv_pairs=16).batch(0, 1)


def test_text_packs_short_documents_with_segment_ids(tmp_path):
  for i, body in enumerate([b"alpha\n", b"bravo charlie\n", b"d" * 50, b"echo\n"]):
    (tmp_path / f"{i}.txt").write_bytes(body)
  task = tasks.Text(seq_len=16, glob=str(tmp_path / "*.txt"))
  batch = task.batch(0, 4)
  assert batch["tokens"].shape == (4, 16)
  data, ids = task.corpus()
  assert tasks.decode(data[:19]) == "alpha\nbravo charlie"
  window = task.window(0)  # "alpha\nbravo char" + "l": two documents
  np.testing.assert_array_equal(window["segment_ids"], [0] * 6 + [1] * 10)
  assert window["loss_mask"][5] == 0 and window["loss_mask"].sum() == 15  # no cross-doc target
  np.testing.assert_array_equal(window["targets"][:-1], window["tokens"][1:])
  np.testing.assert_array_equal(task.batch(3, 4)["tokens"], task.batch(3, 4)["tokens"])


def test_text_holds_out_every_kth_file(tmp_path):
  for i in range(4):
    (tmp_path / f"{i}.txt").write_bytes(bytes([ord("a") + i]) * 40)
  task = tasks.Text(seq_len=8, glob=str(tmp_path / "*.txt"), heldout_every=2)
  train, held = task.batch(0, 8)["tokens"], task.batch(0, 8, salt=1)["tokens"]
  assert set(np.unique(train)) <= {ord("b"), ord("d")}  # files 1 and 3
  assert set(np.unique(held)) <= {ord("a"), ord("c")}   # files 0 and 2
  assert task.batch(0, 2, salt=1, seq_len=32)["tokens"].shape == (2, 32)


def test_text_default_corpus_is_the_stdlib():
  assert os.path.basename(tasks.DEFAULT_TEXT_GLOB) == "*.py"
  task = tasks.Text(seq_len=64, max_bytes=1 << 16)
  assert task.batch(0, 2)["tokens"].shape == (2, 64)


def test_make_task_rejects_unknown_names_and_fields():
  with pytest.raises(ValueError, match="unknown task"):
    tasks.make_task({"name": "nope"})
  with pytest.raises(ValueError, match="no fields"):
    tasks.make_task({"name": "mqar", "seq_len": 64, "digits": 3})
