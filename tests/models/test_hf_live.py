"""Live parity against transformers (marker `hf_live`; skipped without torch + transformers).

The fixture tests' checks on freshly built models (tests/models/hf_fixtures/make.py, a new
seed), transformers' own RoPE tables against `models.rope` for every rope type (dynamic at
lengths below and above the original), and `models.hf.save` read back by transformers'
`from_pretrained` with the same logits.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models import hf  # pylint: disable=g-import-not-at-top,wrong-import-position
from models.hf import hf_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from models.rope import Rope  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.models import hf_parity  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.models.hf_fixtures import make  # pylint: disable=wrong-import-position
from tests.models.test_hf_fixtures import ROOT, golden  # pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.hf_live


@pytest.mark.parametrize("case", list(make.CASES))
def test_live_parity(case, tmp_path):
  model = make.build(case, seed=1)
  model.save_pretrained(tmp_path, safe_serialization=True)
  fresh = type(model).from_pretrained(tmp_path, attn_implementation="eager").float().eval()
  data = make.inputs(seed=1)
  hf_parity.assert_parity(hf.load(tmp_path), make.golden(model, data, fresh))


ROPES = [
    dict(rope_type="default"),
    dict(rope_type="linear", factor=3.0),
    dict(rope_type="dynamic", factor=3.0),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=256),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=256),
    dict(rope_type="yarn", factor=16.0, original_max_position_embeddings=64, beta_fast=16,
         beta_slow=2, mscale=0.7, mscale_all_dim=1.0, truncate=False),
]


@pytest.mark.parametrize("params", ROPES, ids=lambda p: p["rope_type"])
@pytest.mark.parametrize("seq_len", [100, 1000])
def test_rope_tables_match_transformers(params, seq_len):
  """inv_freq and the attention factor, as transformers' Llama rotary embedding computes them."""
  params = dict(params, rope_theta=10_000.0)
  config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128,
                                    max_position_embeddings=512, rope_parameters=dict(params))
  rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
  x = torch.zeros(1, 1, 1, 128)
  cos, _ = rotary(x, torch.arange(seq_len)[None])
  theta, fields = hf_config.rope_fields(params, 512, 10_000.0)
  rope = Rope(128, theta, **fields)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from models import rope as rope_lib  # pylint: disable=g-import-not-at-top
  inv_freq, factor = rope_lib.SCALINGS[rope.scaling](rope, jnp.int32(seq_len))
  np.testing.assert_allclose(np.asarray(inv_freq), rotary.inv_freq.numpy(), rtol=2e-6)
  assert factor == pytest.approx(float(cos[0, 0, 0]), rel=1e-6)  # cos(0) * attention factor


@pytest.mark.parametrize("case", list(make.CASES))
def test_saved_checkpoint_loads_in_transformers(case, tmp_path):
  hf.save(hf.load(os.path.join(ROOT, case)), tmp_path)
  architecture = make.CASES[case][0]
  model = getattr(transformers, architecture).from_pretrained(
      tmp_path, attn_implementation="eager").float().eval()
  data = golden(case)
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(data["tokens"]),
                   attention_mask=torch.tensor(data["mask"])).logits.numpy()
  valid = data["mask"] > 0
  np.testing.assert_array_equal(logits[valid], data["logits"][valid])
