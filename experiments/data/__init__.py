"""The data a run trains and evaluates on, offline: tasks (`tasks.py`: passkey, needle grid,
MQAR, byte-level text), masked language modelling (`mlm.py`) and the corpus reader
(`corpus.py`: plain text files from a glob, bytes as tokens).

Batches are a pure function of (seed, step, salt), so a resumed run sees the same data. May
import numpy and the standard library only (no JAX, no other part of `experiments`).
"""
