"""models.hf without torch: save / load round trips, strictness, block reads, mesh placement.

`load(save(m))` must equal `m` bit for bit (parameters, dtypes, config) for every fixture
family; bf16 stays bf16; sharded saves carry an index; every config key or tensor the loader
does not understand, and every shape mismatch, is a ValueError naming it; any box of a
parameter read from the checkpoint equals the box of the whole parameter; and an 8-device
FSDP load places each parameter on `models.partition`'s sharding, reads only each device's box,
and holds the same values.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from models import hf, partition
from models.hf import checkpoint as checkpoint_lib
from models.hf import weights as weights_lib
from tests.models.test_hf_fixtures import CASES, ROOT
from tests.multidevice import run_worker


def _params(model) -> dict:
  flat = nnx.to_flat_state(nnx.state(model))
  return {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in flat}


def _architecture(case: str) -> str:
  with open(os.path.join(ROOT, case, "config.json")) as f:
    return json.load(f)["architectures"][0]


@pytest.mark.parametrize("case", CASES)
def test_load_save_load_is_bit_exact(case, tmp_path):
  model = hf.load(os.path.join(ROOT, case))
  assert hf.save(model, tmp_path) == _architecture(case)
  again = hf.load(tmp_path)
  assert again.config == model.config
  ours, theirs = _params(model), _params(again)
  assert ours.keys() == theirs.keys()
  for name in ours:
    assert ours[name].dtype == theirs[name].dtype, name
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_bf16_stays_bf16_and_shards_get_an_index(tmp_path):
  model = hf.load(os.path.join(ROOT, "llama"), dtype="bfloat16")
  hf.save(model, tmp_path, max_shard_size=8_000)
  files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
  assert len(files) > 1 and os.path.isfile(tmp_path / checkpoint_lib.INDEX)
  with checkpoint_lib.Checkpoint(tmp_path) as ckpt:
    assert {ckpt.dtype(name) for name in ckpt.names()} == {np.dtype("bfloat16")}
  again = hf.load(tmp_path)  # no dtype: the stored one
  assert again.config.param_dtype == np.dtype("bfloat16") == again.config.dtype
  for name, value in _params(again).items():
    assert value.dtype == np.dtype("bfloat16"), name
    np.testing.assert_array_equal(value, _params(model)[name])


def _copy(case: str, tmp_path) -> str:
  path = str(tmp_path / case)
  shutil.copytree(os.path.join(ROOT, case), path)
  return path


def _edit_config(path: str, **changes) -> None:
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  config.update(changes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)


@pytest.mark.parametrize("changes,match", [
    (dict(some_new_switch=True), "some_new_switch"),
    (dict(architectures=["FalconForCausalLM"]), "FalconForCausalLM.*supported"),
    (dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4)), "longrope"),
    (dict(rope_parameters=dict(rope_type="linear", factor=2.0, beta=3)), "beta"),
    (dict(rope_parameters=dict(rope_theta=1e4, partial_rotary_factor=0.5)), "partial_rotary"),
    (dict(hidden_act="relu"), "hidden_act"),
    (dict(num_key_value_heads=4), "shape"),
])
def test_config_it_does_not_understand_is_refused(changes, match, tmp_path):
  path = _copy("llama", tmp_path)
  _edit_config(path, **changes)
  with pytest.raises(ValueError, match=match):
    hf.load(path)


def test_unknown_or_missing_tensors_are_refused(tmp_path):
  path = _copy("mistral", tmp_path)
  with checkpoint_lib.Checkpoint(path) as ckpt:
    tensors = {n: ckpt.read(n, tuple(slice(None) for _ in ckpt.shape(n))) for n in ckpt.names()}
  config = json.load(open(os.path.join(path, "config.json")))
  extra = dict(tensors, **{"model.layers.0.self_attn.mystery.weight": np.ones((2,), np.float32)})
  checkpoint_lib.write(path, config, extra, 10**9)
  with pytest.raises(ValueError, match="mystery"):
    hf.load(path)
  tensors.pop("model.norm.weight")
  checkpoint_lib.write(path, config, tensors, 10**9)
  with pytest.raises(ValueError, match="model.norm.weight"):
    hf.load(path)


def test_save_refuses_what_transformers_cannot_express(tmp_path):
  model = hf.load(os.path.join(ROOT, "llama"))
  with pytest.raises(ValueError, match="Gemma3ForCausalLM cannot express"):
    hf.save(model, tmp_path, architecture="Gemma3ForCausalLM")


@pytest.mark.parametrize("case", ["modernbert_bias", "qwen2", "llama_mqa_bias_tied_linear"])
def test_any_box_of_a_parameter_equals_that_box_of_the_whole(case):
  """Random boxes of fused (Wqkv rows, [gate | up]), transposed and reshaped parameters."""
  model = hf.load(os.path.join(ROOT, case))
  values = _params(model)
  rng = np.random.default_rng(0)
  with checkpoint_lib.Checkpoint(os.path.join(ROOT, case)) as ckpt:
    for param in hf.family.get(_architecture(case)).params(model.config):
      shape = values[param.path].shape
      for _ in range(3):
        box = tuple(slice(*sorted(rng.integers(0, n + 1, size=2))) for n in shape)
        block = weights_lib.read_block(ckpt, param, shape, box)
        np.testing.assert_array_equal(block, values[param.path][box], err_msg=param.path)


def test_partition_rule():
  mesh = jax.make_mesh((1, 1), ("data", "seq"))
  assert partition.param_spec((64, 256), mesh, fsdp=True) == jax.sharding.PartitionSpec()


def test_fsdp_load_on_8_devices():
  result = run_worker("tests.models.test_hf_checkpoint", "fsdp_worker", devices=8)
  assert result["placed"] == result["params"] > 0, result
  assert result["split"] > 0 and result["equal"], result
  # Each device's callback read exactly its shard (1/8 of a split parameter), nothing more.
  assert result["max_read_over_block"] == 1.0, result
  assert result["max_split_block_fraction"] == 1 / 8, result


def fsdp_worker() -> dict:
  """In an 8-device subprocess: load the sharded llama fixture FSDP-split over data:8."""
  mesh = jax.make_mesh((8, 1), ("data", "seq"))
  path = os.path.join(ROOT, "llama")
  reads, calls = [], []
  read, read_block = checkpoint_lib.Checkpoint.read, weights_lib.read_block

  def counting_read(self, name, box):
    reads.append(block := read(self, name, box))
    return block

  def counting_read_block(ckpt, param, shape, box=None):
    reads.clear()
    block = read_block(ckpt, param, shape, box)
    calls.append((sum(r.size for r in reads) / block.size, block.size / np.prod(shape), shape))
    return block

  checkpoint_lib.Checkpoint.read, weights_lib.read_block = counting_read, counting_read_block
  try:
    sharded = hf.load(path, mesh=mesh)
  finally:
    checkpoint_lib.Checkpoint.read, weights_lib.read_block = read, read_block
  plain = _params(hf.load(path))
  flat = nnx.to_flat_state(nnx.state(sharded))
  placed = split = 0
  equal = True
  for path_, var in flat:
    value = var.get_value()
    spec = partition.param_spec(value.shape, mesh, fsdp=True)
    placed += value.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), value.ndim)
    split += spec != jax.sharding.PartitionSpec()
    equal &= bool(np.array_equal(np.asarray(value), plain[".".join(map(str, path_))]))
  split_fractions = [f for _, f, shape in calls
                     if partition.param_spec(shape, mesh, True) != jax.sharding.PartitionSpec()]
  return dict(params=len(flat), placed=int(placed), split=int(split), equal=equal,
              max_read_over_block=max(r for r, _, _ in calls),
              max_split_block_fraction=max(split_fractions))
