"""ModelConfig validation, layer patterns, and the layer-kind registry."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx

from models import kinds
from models.config import ModelConfig
from models.kinds import KindSettings, LayerKind
from models.transformer import Transformer

TINY = dict(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64)


def test_defaults_are_filled_and_hashable():
  config = ModelConfig(d_model=32, num_heads=4)
  assert (config.num_kv_heads, config.head_dim, config.mlp_dim) == (4, 8, 128)
  assert config.dtype == jnp.float32
  hash(config)
  assert config.kind_settings("global").attention == "flash"
  assert config.kind_settings("local").attention == "local"


def test_six_layer_pattern_builds_global_at_0_and_3_only():
  config = ModelConfig(num_layers=6, layer_pattern=("global", "local", "local"),
                       kinds={"local": KindSettings(window=8)}, **TINY)
  assert config.layer_kinds == ("global", "local", "local") * 2
  model = Transformer(config, rngs=nnx.Rngs(0))
  attn = [block.attn for block in model.blocks]
  assert [i for i, a in enumerate(attn) if a.kind == "global"] == [0, 3]
  assert [a.window for a in attn] == [0, 8, 8, 0, 8, 8]
  assert [a.attention_name for a in attn] == ["flash", "local", "local"] * 2
  assert [a.rope.theta for a in attn] == [160_000.0, 10_000.0, 10_000.0] * 2


def test_kind_overrides_merge_with_defaults():
  config = ModelConfig(layer_pattern=("global", "local"),
                       kinds={"global": KindSettings(attention="dense", rope_theta=1e6),
                              "local": dict(window=16, options={"implementation": "xla"})},
                       **TINY)
  assert config.kind_settings("global") == KindSettings("dense", 0, 1e6, ())
  assert config.kind_settings("local") == KindSettings("local", 16, 10_000.0,
                                                       (("implementation", "xla"),))


def test_modernbert_preset():
  config = ModelConfig.modernbert(**TINY)
  assert not config.causal and config.mlm_head and config.num_layers == 22
  assert config.layer_kinds.count("global") == 8
  assert config.kind_settings("local").window == 128
  assert config.kind_settings("global").rope_theta == 160_000.0


def test_registering_a_layer_kind_needs_no_model_change(monkeypatch):
  monkeypatch.setattr(kinds, "_KINDS", dict(kinds._KINDS))  # undone after the test
  kinds.register_layer_kind("local3", LayerKind(KindSettings("dense", 3, 500.0)))
  config = ModelConfig(num_layers=2, layer_pattern=("global", "local3"), **TINY)
  model = Transformer(config, rngs=nnx.Rngs(0))
  assert (model.blocks[1].attn.window, model.blocks[1].attn.rope.theta) == (3, 500.0)


@pytest.mark.parametrize("fields,match", [
    (dict(num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(num_heads=4, head_dim=7), "even"),
    (dict(d_model=30, num_heads=4), "divisible by num_heads"),
    (dict(num_layers=0), "num_layers must be a positive int"),
    (dict(layer_pattern=("global", "sliding")), r"unknown layer kind 'sliding'.*'global', 'local'"),
    (dict(layer_pattern=()), "non-empty"),
    (dict(layer_pattern="global"), "tuple of layer kinds"),
    (dict(kinds={"local": KindSettings(window=-1)}), "window must be an int >= 0"),
    (dict(kinds={"nope": KindSettings(window=4)}), "unknown layer kind 'nope'"),
    (dict(kinds={"global": KindSettings(attention="magic")}), "unknown attention 'magic'"),
    (dict(kinds={"local": KindSettings(sinks=-2)}), "sinks must be an int >= 0"),
    (dict(kinds={"alibi": KindSettings(window=8, sinks=2)}, layer_pattern=("alibi",)),
     "sinks with alibi=True"),
    (dict(kinds={"local": KindSettings(sink=1)}), "sink must be True, False or None"),
    (dict(mlp="relu"), "unknown mlp"),
    (dict(norm="batch"), "unknown norm"),
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(rope_scaling="yarn", rope_factor=4.0), "original_length"),
    (dict(rope_scaling="xpos"), "unknown rope scaling"),
    (dict(rope_factor=2.0), "needs a rope scaling"),
])
def test_bad_configs_raise(fields, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**{**TINY, **fields})


def test_registry_errors():
  with pytest.raises(ValueError, match="defaults must set"):
    kinds.register_layer_kind("half", LayerKind(KindSettings(window=4)))
  with pytest.raises(ValueError, match="already registered"):
    kinds.register_layer_kind("global", LayerKind(KindSettings("dense", 0, 1.0)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(qk_norm="batch"), "qk_norm"),
    (dict(mlm_activation="relu6"), "mlm_activation"),
    (dict(embed_scale=0.0), "embed_scale"),
    (dict(attention_scale=-1.0), "attention_scale"),
    (dict(final_logit_soft_cap=0), "final_logit_soft_cap"),
    (dict(kinds={"global": KindSettings(rope={"thetaa": 2.0})}), "thetaa"),
    (dict(rope_scaling="llama3", rope_factor=8.0), "original_length"),
])
def test_bad_checkpoint_options_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**kwargs, **TINY)


def test_kind_rope_overrides_the_models_scaling():
  """Gemma 3: full layers scaled (linear 8), sliding layers plain RoPE at their own theta."""
  config = ModelConfig(layer_pattern=("local", "global"), rope_scaling="linear", rope_factor=8.0,
                       kinds={"local": KindSettings(window=4, rope_theta=1e4,
                                                    rope={"scaling": "none", "factor": 1.0}),
                              "global": KindSettings(rope_theta=1e6)}, **TINY)
  assert config.rope("global").scaling == "linear" and config.rope("global").factor == 8.0
  assert config.rope("local").scaling == "none" and config.rope("local").theta == 1e4
