"""The data a run trains and evaluates on, offline: tasks (`tasks.py`: passkey, needle grid,
MQAR, text), masked language modelling (`mlm.py`), the corpus reader (`corpus.py`: plain text
files from a glob), tokenizers (`tokenizer.py`: bytes or a local tokenizer.json), token files
larger than memory (`token_file.py`, written by `tokenize_corpus.py`) and the task that trains
on them (`tokens.py`).

Batches are a pure function of (seed, step, salt), so a resumed run sees the same data. May
import numpy, tqdm, `tokenizers` (lazily, for a real tokenizer) and the standard library only
(no JAX, no other part of `experiments`).
"""
