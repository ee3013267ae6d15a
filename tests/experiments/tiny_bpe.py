"""A tiny byte-level BPE trained offline on a few standard-library files (about a second).

    directory = train_bpe(tmp_path)   # tokenizer.json + tokenizer_config.json (BOS <s>, EOS </s>)

Byte-level pre-tokenization and decoding make it lossless (decode(encode(text)) == text), as
GPT-2/Llama 3/Qwen tokenizers are; `<s>`, `</s>`, `<mask>` are its special tokens (ids 0-2).
"""

from __future__ import annotations

import json
import os

from experiments.data import corpus

FILES = ("textwrap.py", "glob.py", "fnmatch.py", "string.py")


def stdlib_texts() -> list[str]:
  stdlib = os.path.dirname(corpus.DEFAULT_TEXT_GLOB)
  texts = []
  for name in FILES:
    with open(os.path.join(stdlib, name), encoding="utf-8") as f:
      texts.append(f.read())
  return texts


def train_bpe(directory, vocab_size: int = 384, config: dict | None = None,
              dummy_prefix: bool = False) -> str:
  """Writes `tokenizer.json` (and `tokenizer_config.json` from `config`, default: add BOS,
  EOS `</s>`, mask `<mask>`) into `directory`; returns the directory. `dummy_prefix`:
  SentencePiece-style instead (spaces as "▁", one prepended to every encoded text, as Llama 2
  and Mistral's tokenizers do)."""
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  if dummy_prefix:
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<mask>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(stdlib_texts(), trainer)
  directory = str(directory)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = dict(add_bos_token=True, bos_token="<s>", eos_token="</s>",
                mask_token="<mask>") if config is None else config
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return directory
