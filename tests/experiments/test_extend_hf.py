"""The context-extension recipe for a pretrained checkpoint (experiments/configs/extend_hf.py).

The end-to-end smoke is notebooks/06_extend_hf.ipynb, run by tests/test_notebooks.py with
assertions in its cells: on 2 host devices a tiny random Llama with its tokenizer -> a token
file of a few standard-library sources -> YaRN 4x, two steps at 4x its length with `seq:2`
ring attention -> the needle grid -> an exported Hugging Face directory that loads back with
equal logits and its YaRN scaling -> the DSA conversion of that run (weights kept, indexers
added). This file checks the recipe's configs and the stage chaining.
"""

from __future__ import annotations

import json
import os

import pytest

from experiments.configs import common, extend_hf
from experiments.training import hf_bridge
from tests.experiments import tiny_llama



def test_variants_are_stages_with_an_optional_scaling():
  for variant in ("4k", "16k,llama3", "64k,theta", "dsa_warmup", "dsa_sparse", "4k,smoke",
                  "smoke,dsa_sparse"):
    common.check_config(extend_hf.get_config(variant))
  lengths = [extend_hf.get_config(s).task.seq_len for s in extend_hf.STAGES]
  assert lengths == sorted(lengths) and extend_hf.get_config("64k").mesh == "seq:8"
  theta = extend_hf.get_config("16k,theta").model
  assert (theta.rope_scaling, theta.kinds["global"].rope_theta) == ("none", extend_hf.NEW_THETA)
  warmup = extend_hf.get_config("dsa_warmup")
  assert (warmup.trainable, warmup.model.layer_pattern) == ("indexer", ("dsa",))
  assert extend_hf.get_config("dsa_sparse").model.kinds.dsa.options.stage == "sparse"
  with pytest.raises(ValueError, match="at most one RoPE scaling"):
    extend_hf.get_config("4k,yarn,llama3")
  with pytest.raises(ValueError, match="unknown variant"):
    extend_hf.get_config("4k,16k")


def test_a_stage_takes_its_model_from_the_previous_stage_workdir(tmp_path):
  checkpoint = tiny_llama.make(tmp_path / "llama")
  first = extend_hf.get_config("4k,smoke")
  first.init_from = checkpoint
  first = hf_bridge.with_checkpoint_model(first)
  assert (first.model.rope_factor, first.model.rope_original_length) == (4.0, 64)
  short = extend_hf.get_config("4k,smoke")
  short.update(init_from=checkpoint)
  short.task.seq_len = 32
  with pytest.raises(ValueError, match="below the checkpoint's original length 64"):
    hf_bridge.with_checkpoint_model(short)
  workdir = tmp_path / "ext4k"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(first.to_dict()))
  second = extend_hf.get_config("16k,smoke")
  second.init_from = str(workdir)
  second = hf_bridge.with_checkpoint_model(second)
  assert second.model.rope_factor == 1024 / 64 and second.model.rope_original_length == 64
  assert second.model.d_model == tiny_llama.CONFIG.d_model
  assert second.task.tokenizer == os.path.abspath(checkpoint)
  assert hf_bridge.hf_origin(str(workdir)) == os.path.abspath(checkpoint)
  assert hf_bridge.architecture_of(str(workdir)) == "LlamaForCausalLM"
  dsa = extend_hf.get_config("dsa_warmup,smoke")
  dsa.init_from = str(workdir)
  dsa = hf_bridge.with_checkpoint_model(dsa)
  assert tuple(dsa.model.layer_pattern) == ("dsa",)
  assert dsa.model.kinds.dsa.rope_theta == 10_000.0  # the RoPE base of the layers it replaces
  assert (dsa.model.rope_scaling, dsa.model.rope_factor) == ("yarn_hf", 4.0)
