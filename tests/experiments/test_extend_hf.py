"""The context-extension recipe for a pretrained checkpoint (experiments/configs/extend_hf.py).

The smoke runs the whole path end to end on 2 host devices: a tiny random Llama with its
tokenizer (`tiny_llama`) -> a token file of a few standard-library sources -> YaRN 4x, two
steps at 4x its length with `seq:2` ring attention -> the needle grid -> an exported Hugging
Face directory that loads back with equal logits -> the DSA conversion of that run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import common, extend_hf
from experiments.training import hf_bridge
from tests.experiments import tiny_llama
from tests.multidevice import run_worker

TEXTS = ("textwrap.py", "glob.py", "fnmatch.py", "string.py", "shlex.py", "bisect.py")


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


def smoke_worker() -> dict:
  """The end-to-end path (module docstring) on this process's devices; returns what it saw."""
  # pylint: disable=g-import-not-at-top
  from experiments.data import corpus, tokenize_corpus
  from experiments.evaluation import runs, train_and_evaluate
  from experiments.training import checkpoints as ckpt_lib
  from experiments.training import sharding, trainer
  from models import hf
  root = tempfile.mkdtemp(prefix="extend_hf_smoke_")
  try:
    checkpoint = tiny_llama.make(os.path.join(root, "llama"))
    texts = os.path.join(root, "text")
    os.makedirs(texts)
    for name in TEXTS:
      shutil.copy(os.path.join(os.path.dirname(corpus.DEFAULT_TEXT_GLOB), name),
                  os.path.join(texts, name + ".txt"))
    tokens = os.path.join(root, "tokens")
    tokenize_corpus.tokenize(os.path.join(texts, "*.txt"), checkpoint, tokens, progress=False)
    config = extend_hf.get_config("4k,smoke")
    config.update(init_from=checkpoint, mesh="seq:2")
    config.task.path = tokens
    workdir = os.path.join(root, "ext4k")
    result = train_and_evaluate(config, workdir)
    ring = sharding.ring_config(trainer.model_config(hf_bridge.with_checkpoint_model(config)),
                                sharding.make_mesh("seq:2")).kind_settings("global")
    exported = os.path.join(root, "exported")
    run_config, trained, _ = runs.load_run(workdir)
    architecture = hf_bridge.export(trained, run_config, exported)
    ids = jnp.asarray(np.arange(2 * 200).reshape(2, 200) % 384)
    loaded = hf.load(exported)
    dsa = extend_hf.get_config("dsa_warmup,smoke")
    dsa.update(init_from=workdir)
    dsa.task.path = tokens
    converted = trainer.make_model(hf_bridge.with_checkpoint_model(dsa))
    ckpt_lib.load_params(converted, workdir, allow_added=True)
    ours = dict(nnx.state(converted, nnx.Param).flat_state())
    theirs = dict(nnx.state(trained, nnx.Param).flat_state())
    return dict(
        step=result["step"], loss=result["loss"], niah=result["eval"]["niah"],
        ring=ring.attention, architecture=architecture,
        equal_logits=bool(np.array_equal(loaded(ids)[0], trained(ids)[0])),
        exported_rope=[loaded.config.rope_scaling, loaded.config.rope_factor,
                       loaded.config.rope_original_length],
        dsa_kept=all(np.array_equal(ours[p][...], v[...]) for p, v in theirs.items()),
        dsa_added=sorted({str(p[-2]) for p in set(ours) - set(theirs)}))
  finally:
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_end_to_end_smoke_on_two_devices():
  seen = run_worker("tests.experiments.test_extend_hf", "smoke_worker", devices=2)
  assert seen["step"] == 2 and np.isfinite(seen["loss"]) and seen["ring"] == "ring"
  assert [(r["length"], r["depth"]) for r in seen["niah"]] == [(256, 0.0), (256, 1.0)]
  assert seen["architecture"] == "LlamaForCausalLM" and seen["equal_logits"]
  assert seen["exported_rope"] == ["yarn_hf", 4.0, 64]
  assert seen["dsa_kept"] and set(seen["dsa_added"]) == {"k_norm", "wk", "wq", "ww"}
