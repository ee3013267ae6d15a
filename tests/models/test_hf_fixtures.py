"""Parity with transformers from committed fixtures (no torch needed): every family, both paths.

Each fixture (tests/models/hf_fixtures/<case>/, made by make.py there) is a tiny random
transformers checkpoint and its golden outputs. `models.hf.load` must reproduce, in float32,
the logits within 1e-4 x max |logit| with the same argmax at every real position (padded rows
included, padding excluded), and for decoders the same greedy 16-token continuation through the
KV cache (`models.generate`), with attention="dense" (the reference) and the flash path.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from models import hf
from tests.models import hf_parity

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_fixtures")
CASES = sorted(d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "golden.npz")))


def golden(case: str) -> dict[str, np.ndarray]:
  return dict(np.load(os.path.join(ROOT, case, "golden.npz")))


def test_every_family_has_a_fixture():
  architectures = set()
  for case in CASES:
    with open(os.path.join(ROOT, case, "config.json")) as f:
      architectures.add(__import__("json").load(f)["architectures"][0])
  assert architectures == set(hf.supported())


@pytest.mark.parametrize("attention", ["dense", "flash"])
@pytest.mark.parametrize("case", CASES)
def test_parity_with_transformers(case, attention):
  model = hf.load(os.path.join(ROOT, case), attention=attention)
  hf_parity.assert_parity(model, golden(case))
