r"""Tokenize a text corpus into a token file (larger than memory) for the `tokens` task.

    python -m experiments.tokenize --input='/data/books/**/*.txt' --tokenizer=/ckpt/llama \
        --output=/data/books_llama
    python -m experiments.tokenize --input='/data/web/*.jsonl' --text_field=text \
        --tokenizer=/ckpt/qwen/tokenizer.json --output=/data/web_qwen
    python -m experiments.train --config=experiments/configs/tokens.py --workdir=/tmp/tok \
        --config.task.path=/data/books_llama --config.task.tokenizer=/ckpt/llama

Each file matching `--input` is one document, except `.jsonl` files: one document per line
(field `--text_field`). `--tokenizer` is `bytes` or a local `tokenizer.json` (or the directory
of a Hugging Face snapshot holding it with `tokenizer_config.json`: BOS/EOS as it defines
them). Writes `tokens.bin` (uint16, or uint32 for vocabularies over 65536), `offsets.npy` and
`header.json` into `--output` (experiments/data/token_file.py) and prints the throughput.
An existing token file is refused unless `--overwrite`.
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments.data import tokenize_corpus

FLAGS = flags.FLAGS


def main(argv):
  del argv
  try:
    summary = tokenize_corpus.tokenize(
        FLAGS.input, FLAGS.tokenizer, FLAGS.output, text_field=FLAGS.text_field,
        batch_bytes=int(FLAGS.batch_mb * (1 << 20)), overwrite=FLAGS.overwrite,
        progress=FLAGS.progress)
  except (ValueError, FileExistsError) as e:
    sys.exit(f"error: {e}")
  print(f"{FLAGS.output}: {summary['num_documents']} documents, {summary['num_tokens']} "
        f"{summary['dtype']} tokens (tokenizer {summary['tokenizer_hash']}) from "
        f"{summary['input_bytes'] / 1e6:.1f} MB in {summary['seconds']:.1f} s: "
        f"{summary['mb_per_s']:.2f} MB/s.")


def define_flags() -> None:
  """The command-line flags (defined when run as a script or by a test)."""
  flags.DEFINE_string("input", None, "Glob of text files (** recursive); .jsonl files hold "
                      "one JSON document per line.")
  flags.DEFINE_string("output", None, "Directory of the token file.")
  flags.DEFINE_string("tokenizer", "bytes", "bytes, a tokenizer.json, or a directory holding "
                      "one (+ tokenizer_config.json).")
  flags.DEFINE_string("text_field", "text", "The text field of .jsonl lines.")
  flags.DEFINE_float("batch_mb", 8.0, "Input MiB per batch-encoder call.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing token file in --output.")
  flags.DEFINE_bool("progress", True, "tqdm progress bar.")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["input", "output"])
  app.run(main)
