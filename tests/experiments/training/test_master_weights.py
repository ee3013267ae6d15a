"""Float32 optimizer state for bf16 parameters: master weights follow the float32 trajectory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.configs import common
from experiments.training import checkpoints as ckpt_lib
from experiments.training import master_weights, trainer


def _tree(seed: int, dtype):
  keys = jax.random.split(jax.random.key(seed), 2)
  return {"w": (0.02 * jax.random.normal(keys[0], (8, 16))).astype(dtype),
          "b": jax.random.normal(keys[1], (16,)).astype(jnp.float32)}  # float32: no copy


def test_master_weights_follow_the_float32_run_and_round_into_the_parameters():
  inner = optax.adamw(2e-5, weight_decay=0.01)
  tx = master_weights.with_master_weights(inner, "float32")
  params = _tree(0, jnp.bfloat16)
  reference = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  state, ref_state = tx.init(params), inner.init(reference)
  assert state.master["w"].dtype == jnp.float32 and isinstance(state.master["b"], optax.MaskedNode)
  assert {x.dtype for x in jax.tree.leaves(state.inner) if x.ndim} == {jnp.dtype(jnp.float32)}
  plain_tx = optax.adamw(2e-5, weight_decay=0.01)  # the bf16 baseline: moments and sums in bf16
  plain, plain_state = params, plain_tx.init(params)
  for step in range(5):
    grads = _tree(10 + step, jnp.bfloat16)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    ref_grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    ref_updates, ref_state = inner.update(ref_grads, ref_state, reference)
    reference = optax.apply_updates(reference, ref_updates)
    plain_updates, plain_state = plain_tx.update(grads, plain_state, plain)
    plain = optax.apply_updates(plain, plain_updates)
  np.testing.assert_array_equal(state.master["w"], reference["w"])
  np.testing.assert_array_equal(params["b"], reference["b"])
  assert params["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(params["w"], reference["w"].astype(jnp.bfloat16))
  start = np.asarray(_tree(0, jnp.bfloat16)["w"], np.float32)
  moved = lambda w: float(np.mean(np.abs(np.asarray(w, np.float32) - start)))
  assert moved(plain["w"]) < 0.5 * moved(reference["w"])  # bf16 AdamW loses most of its steps


def test_trainer_keeps_float32_state_for_bf16_parameters_and_checkpoints_it(tmp_path):
  config = common.base_config()
  make = lambda dtype: nnx.Linear(4, 8, param_dtype=dtype, rngs=nnx.Rngs(0))
  model = make(jnp.bfloat16)
  optimizer = trainer.make_optimizer(model, config)
  assert isinstance(optimizer.opt_state, master_weights.MasterWeightsState)
  floats = lambda tree: [x for x in jax.tree.leaves(nnx.state(tree)) if x.ndim]
  assert {x.dtype for x in floats(optimizer.opt_state)} == {jnp.dtype(jnp.float32)}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), nnx.state(model, nnx.Param))
  optimizer.update(model, grads)
  ckpt = ckpt_lib.Checkpoints(str(tmp_path / "ckpt"))
  ckpt.save(1, model, optimizer, dict(model=None))
  fresh = make(jnp.bfloat16)
  fresh_opt = trainer.make_optimizer(fresh, config)
  assert ckpt.restore(fresh, fresh_opt, None)["step"] == 1
  ckpt.close()
  assert all(np.array_equal(a, b) for a, b in zip(floats(fresh_opt.opt_state),
                                                   floats(optimizer.opt_state)))
  assert all(np.array_equal(a, b) for a, b in zip(floats(fresh), floats(model)))
  # float32 parameters: plain AdamW state (checkpoints of earlier runs still restore)
  plain = trainer.make_optimizer(make(jnp.float32), config)
  assert not isinstance(plain.opt_state, master_weights.MasterWeightsState)
