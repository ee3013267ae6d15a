"""Sharded training on 8 host CPU devices: mesh parsing, equality with one device, resharding
checkpoints, and the collectives of the compiled ring-mode step.

The multi-device checks run in subprocesses (tests/multidevice.py); the workers return numbers
that the pytest functions check. jax-using imports stay inside the functions.
"""

from __future__ import annotations

import pytest

from tests.multidevice import run_worker

SEQ_LEN, BATCH = 128, 4
LM_WEIGHT = 0.5  # the LM loss reads token adjacency: must survive the zig-zag permutation


def _config():
  from experiments.configs import passkey  # pylint: disable=g-import-not-at-top
  config = passkey.get_config("smoke")
  config.task.seq_len = SEQ_LEN
  config.batch_size = BATCH
  config.model.num_layers = 2  # one global layer, one local (window 16: a one-block halo)
  config.optim.warmup_steps = 0  # a nonzero learning rate at step 0
  return config


def _step_on(mesh_spec: str | None):
  """(loss, params as numpy, hlo text or None) after one train step on a mesh (None: 1 device)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from experiments.data import tasks  # pylint: disable=g-import-not-at-top
  from experiments.training import sharding, trainer  # pylint: disable=g-import-not-at-top
  from models import Transformer  # pylint: disable=g-import-not-at-top
  config = _config()
  batch = tasks.make_task(config.task, seed=0).batch(0, BATCH)
  mesh = None if mesh_spec is None else sharding.make_mesh(mesh_spec)
  model = Transformer(sharding.ring_config(trainer.model_config(config), mesh),
                      rngs=nnx.Rngs(config.seed))
  optimizer = trainer.make_optimizer(model, config)
  init = jax.tree.map(np.asarray, jax.device_get(nnx.state(model, nnx.Param)))
  hlo = None
  if mesh is None:
    metrics = trainer.train_step(model, optimizer, trainer.to_device(batch), lm_weight=LM_WEIGHT)
  else:
    sharding.shard_state(model, optimizer, mesh)
    with jax.sharding.set_mesh(mesh):
      placed = sharding.shard_batch(batch, mesh, layout=sharding.batch_layout(model.config))
      hlo = trainer.train_step.lower(model, optimizer, placed,
                                     lm_weight=LM_WEIGHT).compile().as_text()
      metrics = trainer.train_step(model, optimizer, placed, lm_weight=LM_WEIGHT)
  params = jax.tree.map(np.asarray, jax.device_get(nnx.state(model, nnx.Param)))
  moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                           init, params)))
  assert moved > 1e-4, f"the step did not change the parameters ({moved})"
  return float(metrics["loss"]), params, hlo


def train_step_equality():
  """Worker: one step on one device vs on data:2,seq:4 (ring attention); + HLO collectives.

  Run `optimised` (compiled as users run it; the suite's other tests compile at -O0,
  tests/fast_compile.py): the 1e-5 bound is about float32 summation order, which -O0 changes
  (unvectorised loops; there the parameters differ by 1.9e-5 after the step, the losses agree).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  loss_1, params_1, _ = _step_on(None)
  loss_8, params_8, hlo = _step_on("data:2,seq:4")
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                       params_1, params_8))
  gathers = [line.split("=")[1].split("all-gather")[0].strip()
             for line in hlo.splitlines() if " all-gather(" in line or "all-gather-start(" in line]
  return {"loss_1": loss_1, "loss_8": loss_8, "max_param_diff": max(diffs),
          "collective_permutes": hlo.count("collective-permute"), "all_gathers": gathers}


def checkpoint_resharding():
  """Worker: train 1 step on data:8 (FSDP), save; restore on 1 device and on data:2,seq:4."""
  import json  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from experiments.training import checkpoints  # pylint: disable=g-import-not-at-top
  from experiments.data import tasks  # pylint: disable=g-import-not-at-top
  from experiments.training import sharding, trainer  # pylint: disable=g-import-not-at-top
  from models import Transformer  # pylint: disable=g-import-not-at-top
  config = _config()
  meta = {"model": json.loads(json.dumps(config.model.to_dict()))}  # as train.py stores it

  def build(mesh, fsdp=False):
    model = Transformer(sharding.ring_config(trainer.model_config(config), mesh),
                        rngs=nnx.Rngs(config.seed + 1))  # different init: restore must overwrite
    optimizer = trainer.make_optimizer(model, config)
    if mesh is not None:
      sharding.shard_state(model, optimizer, mesh, fsdp=fsdp)
    return model, optimizer

  out = {}
  with tempfile.TemporaryDirectory() as workdir:
    mesh8 = sharding.make_mesh("data:8")
    model, optimizer = build(mesh8, fsdp=True)
    kernel = model.blocks[0].attn.q_proj.kernel.value
    out["saved_sharding"] = str(kernel.sharding.spec)
    with jax.sharding.set_mesh(mesh8):
      batch = sharding.shard_batch(tasks.make_task(config.task, seed=0).batch(0, 8), mesh8)
      trainer.train_step(model, optimizer, batch)
    saved = jax.tree.map(np.asarray, jax.device_get(nnx.state(model, nnx.Param)))
    saved_opt = jax.tree.map(np.asarray, jax.device_get(nnx.state(optimizer)))
    ckpt = checkpoints.Checkpoints(workdir)
    ckpt.save(1, model, optimizer, meta)
    ckpt.close()
    for name, spec in (("one_device", None), ("data2_seq4", "data:2,seq:4")):
      mesh = None if spec is None else sharding.make_mesh(spec)
      target, target_opt = build(mesh)
      ckpt = checkpoints.Checkpoints(workdir)
      ckpt.restore(target, target_opt, meta["model"])
      ckpt.close()
      got = jax.tree.map(np.asarray, jax.device_get(nnx.state(target, nnx.Param)))
      got_opt = jax.tree.map(np.asarray, jax.device_get(nnx.state(target_opt)))
      same = jax.tree.leaves(jax.tree.map(np.array_equal, saved, got))
      same_opt = jax.tree.leaves(jax.tree.map(np.array_equal, saved_opt, got_opt))
      restored = target.blocks[0].attn.q_proj.kernel.value
      out[name] = {"params_equal": all(same), "opt_equal": all(same_opt),
                   "devices": len(restored.sharding.device_set)}
  return out


def train_entry_point():
  """Worker: `experiments.train.train` on data:2,seq:4 with multihost=True (one process, a local
  coordinator), 2 steps; then resumed for a 3rd step on data:8 with FSDP (a different mesh),
  with a larger batch (a computation change: allowed, and recorded)."""
  import os  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  os.environ.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="1",
                    JAX_PROCESS_ID="0")
  import jax  # pylint: disable=g-import-not-at-top
  from experiments.evaluation import train_and_evaluate  # pylint: disable=g-import-not-at-top
  from experiments.training import loop  # pylint: disable=g-import-not-at-top
  config = _config()
  config.update(num_steps=2, log_every=1, checkpoint_every=2, eval_after_train=False,
                progress=False, mesh="data:2,seq:4", multihost=True)
  out = {}
  with tempfile.TemporaryDirectory() as workdir:
    first = train_and_evaluate(config, workdir)
    out["processes"] = jax.process_count()
    config.update(num_steps=3, batch_size=8, mesh="data:8", fsdp=True, multihost=False,
                  allow_config_change=True)
    second = train_and_evaluate(config, workdir)
    out["first"] = {k: first[k] for k in ("step", "loss", "eval_loss")}
    out["second"] = {k: second[k] for k in ("step", "loss")}
    out["steps_logged"] = [row["step"] for row in loop.read_metrics(
        os.path.join(workdir, "metrics.jsonl"))]
    with open(os.path.join(workdir, "config_history.jsonl")) as f:
      out["history"] = f.read()
  return out


# --- pytest --------------------------------------------------------------------------------------


def test_parse_and_make_mesh_errors():
  from experiments.training import sharding  # pylint: disable=g-import-not-at-top
  assert sharding.parse_mesh("data:2,seq:4") == {"data": 2, "seq": 4}
  assert sharding.parse_mesh("seq:-1") == {"seq": -1}
  for bad in ("", "data2", "model:2", "data:2,data:2", "data:x", "data:0", "data:-1,seq:-1"):
    with pytest.raises(ValueError, match="mesh"):
      sharding.parse_mesh(bad)
  with pytest.raises(ValueError, match="devices"):
    sharding.make_mesh("data:3")  # this process has 1 device


def test_ring_config_switches_exact_kinds_only():
  import dataclasses  # pylint: disable=g-import-not-at-top
  from experiments.training import sharding, trainer  # pylint: disable=g-import-not-at-top
  from models import KindSettings  # pylint: disable=g-import-not-at-top

  @dataclasses.dataclass
  class FakeMesh:
    shape: dict

  config = trainer.model_config(_config())
  assert sharding.ring_config(config, None) is config
  assert sharding.ring_config(config, FakeMesh({"data": 8, "seq": 1})) is config
  ring = sharding.ring_config(config, FakeMesh({"data": 2, "seq": 4}))
  assert {ring.kind_settings(k).attention for k in ring.layer_pattern} == {"ring"}
  assert ring.kind_settings("local").window == config.kind_settings("local").window
  # A causal model, every kind ring: batches in the balanced zig-zag layout, permuted once.
  assert dict(ring.kind_settings("global").options) == {"layout": "zigzag", "permuted": True}
  assert sharding.batch_layout(ring) == "zigzag" and sharding.batch_layout(config) == "contiguous"
  with_dsa = dataclasses.replace(config, kinds={"local": KindSettings(attention="dsa")})
  assert sharding.batch_layout(sharding.ring_config(with_dsa, FakeMesh({"seq": 4}))) == (
      "contiguous")
  with pytest.raises(ValueError, match="do not run ring attention"):
    sharding.ring_config(with_dsa, FakeMesh({"seq": 4}), layout="zigzag")


def test_layout_batch_permutes_once_with_positions():
  import numpy as np  # pylint: disable=g-import-not-at-top
  from attention import ring_layout  # pylint: disable=g-import-not-at-top
  from experiments.training import sharding  # pylint: disable=g-import-not-at-top
  seg = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, -1, -1]])
  batch = {"tokens": np.arange(16)[None] + 100, "segment_ids": seg, "other": np.ones(3)}
  assert sharding.layout_batch(batch, "contiguous", 4) == batch
  out = sharding.layout_batch(batch, "zigzag", 4)
  back = {k: ring_layout.from_layout(v, "zigzag", 4) for k, v in out.items() if v.ndim == 2}
  np.testing.assert_array_equal(back["tokens"], batch["tokens"])
  np.testing.assert_array_equal(back["positions"][0], [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5,
                                                       0, 1])
  np.testing.assert_array_equal(back["next_in_doc"][0],
                                [1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0])
  assert (out["other"] == batch["other"]).all()


def test_param_spec_fsdp():
  import dataclasses  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from experiments.training import sharding  # pylint: disable=g-import-not-at-top

  @dataclasses.dataclass
  class FakeMesh:
    shape: dict

  mesh = FakeMesh({"data": 4, "seq": 2})
  assert sharding.param_spec((64, 4, 16), mesh, fsdp=False) == P()
  assert sharding.param_spec((64, 4, 16), mesh, fsdp=True) == P("data")
  assert sharding.param_spec((6, 32), mesh, fsdp=True) == P(None, "data")
  assert sharding.param_spec((3,), mesh, fsdp=True) == P()
  assert sharding.param_spec((), mesh, fsdp=True) == P()


def test_train_step_data2_seq4_equals_one_device():
  result = run_worker(__name__, "train_step_equality", optimised=True)
  assert abs(result["loss_1"] - result["loss_8"]) <= 1e-5, result
  assert result["max_param_diff"] <= 1e-5, result
  # Ring mode: K/V move by collective-permute; nothing gathers a [.., T, K, H] sequence.
  assert result["collective_permutes"] > 0, result
  full_kv = [s for s in result["all_gathers"] if f",{SEQ_LEN}," in s.replace(" ", "")]
  assert not full_kv, result["all_gathers"]


def test_checkpoint_from_data8_restores_on_other_meshes():
  result = run_worker(__name__, "checkpoint_resharding")
  assert "data" in result["saved_sharding"], result
  assert result["one_device"] == {"params_equal": True, "opt_equal": True, "devices": 1}, result
  assert result["data2_seq4"] == {"params_equal": True, "opt_equal": True, "devices": 8}, result


@pytest.mark.slow
def test_train_entry_point_mesh_multihost_and_resume_on_another_mesh():
  import math  # pylint: disable=g-import-not-at-top
  result = run_worker(__name__, "train_entry_point")
  assert result["processes"] == 1, result
  assert result["first"]["step"] == 2 and result["second"]["step"] == 3, result
  assert all(math.isfinite(result[k]["loss"]) for k in ("first", "second")), result
  assert math.isfinite(result["first"]["eval_loss"]), result
  assert result["steps_logged"] == [1, 2, 3], result
  assert '"field": "batch_size", "old": 4, "new": 8' in result["history"], result
