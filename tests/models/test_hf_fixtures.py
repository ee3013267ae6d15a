"""Parity with transformers from committed fixtures (no torch needed): every family, both paths.

Each fixture (tests/models/hf_fixtures/<case>/, made by make.py there) is a tiny random
transformers checkpoint and its golden outputs. `models.hf.load` must reproduce, in float32,
the logits within 1e-4 x max |logit| with the same argmax at every real position (padded rows
included, padding excluded), and for decoders the same greedy 16-token continuation through the
KV cache (`models.generate`), with attention="dense" (the reference) and the flash path.
"""

from __future__ import annotations

import json
import os
import shutil

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
      architectures.add(json.load(f)["architectures"][0])
  assert architectures == set(hf.supported())


@pytest.mark.parametrize("attention", ["dense", "flash"])
@pytest.mark.parametrize("case", CASES)
def test_parity_with_transformers(case, attention):
  model = hf.load(os.path.join(ROOT, case), attention=attention)
  hf_parity.assert_parity(model, golden(case))


@pytest.mark.parametrize("case", ["llama_dynamic", "llama_llama3", "llama_yarn"])
def test_fixtures_see_the_rope_scaling(case, tmp_path):
  """The goldens are sensitive to the scaling: the same weights with plain RoPE miss them."""
  path = str(tmp_path / case)
  shutil.copytree(os.path.join(ROOT, case), path)
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  config["rope_parameters"] = dict(rope_type="default", rope_theta=10_000.0)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  data = golden(case)
  valid = data["mask"] > 0
  wrong = hf_parity.logits(hf.load(path, attention="dense"), data)[valid]
  assert np.max(np.abs(wrong - data["logits"][valid])) > 100 * hf_parity.TOLERANCE * np.max(
      np.abs(data["logits"][valid]))
