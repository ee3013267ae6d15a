"""Importable training and evaluation loop: model and optimizer from a config, jitted steps.

    config = configs.passkey.get_config()
    model = make_model(config)
    optimizer = make_optimizer(model, config)
    metrics = train_step(model, optimizer, batch)          # one AdamW update (nnx.jit)
    scores = eval_step(model, batch)                        # greedy exact match of the answers

Loss: token cross-entropy averaged over `batch["loss_mask"]` (only scored tokens count: the
answers of the recall tasks, every in-document next byte of the text task), plus optionally
`config.lm_loss_weight` times the mean over the other tokens of the documents. With
`config.grad_accum = A` a step splits its batch into A micro-batches and averages their
gradients before one update. With `config.loss_chunk` the cross-entropy is computed a chunk
of positions at a time (`models.chunked_loss`; -1 = automatically past 1 GiB of float32
logits), so the `[B, T, V]` logits never exist. The optimizer is optax AdamW on a
linear-warmup + cosine schedule, after global-norm gradient clipping. A step whose loss,
gradients or updated state are not finite changes nothing (`update_if_finite`) and says so
in its metrics (`applied`).

Exact match of greedy decoding is computed with teacher forcing: the greedy continuation equals
the answer iff the argmax at every answer position, given the correct previous answer tokens,
is the answer token. So one forward pass scores a whole batch (`eval_step`); `evaluate.py`
cross-checks a few rows with `models.generate` (KV-cache decoding).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from experiments.training import master_weights, sharding
from models import KindSettings, ModelConfig, Transformer, chunked_loss

_KIND_FIELDS = tuple(f.name for f in dataclasses.fields(KindSettings))  # alibi included


# --- config -> model and optimizer ---------------------------------------------------------------


def model_config(config: ml_collections.ConfigDict, **overrides) -> ModelConfig:
  """The `ModelConfig` of `config.model` (with field `overrides`, e.g. a new rope scaling)."""
  fields = dict(config.model.to_dict())
  fields.update(overrides)
  pattern = fields.pop("layer_pattern")
  if isinstance(pattern, str):
    pattern = tuple(p.strip() for p in pattern.split(",") if p.strip())
  last = fields.pop("last_layers", ())
  if isinstance(last, str):
    last = tuple(p.strip() for p in last.split(",") if p.strip())
  kinds = {}
  for name, settings in (fields.pop("kinds") or {}).items():
    unknown = sorted(set(settings) - set(_KIND_FIELDS))
    if unknown:
      raise ValueError(f"config.model.kinds.{name} has unknown fields {unknown}; known: "
                       f"{list(_KIND_FIELDS)}.")
    kinds[name] = KindSettings(**settings)
  return ModelConfig(layer_pattern=tuple(pattern), last_layers=tuple(last or ()), kinds=kinds,
                     **fields)


def make_model(config: ml_collections.ConfigDict, *, mesh=None, **overrides) -> Transformer:
  """A freshly initialised Transformer (parameters from `config.seed`).

  With a `mesh` whose `seq` axis is > 1, exact attention kinds run as ring attention
  (`sharding.ring_config`; same parameters).
  """
  return Transformer(sharding.ring_config(model_config(config, **overrides), mesh),
                     rngs=nnx.Rngs(config.seed))


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to `optim.lr`, then cosine decay to `optim.lr * optim.final_lr_ratio`."""
  o = config.optim
  warmup = min(o.warmup_steps, max(config.num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      0.0, o.lr, warmup_steps=warmup, decay_steps=max(config.num_steps, warmup + 1),
      end_value=o.lr * o.final_lr_ratio)


def trainable_params(trainable: str = "") -> nnx.filterlib.Filter:
  """The parameters a run updates: all (`""`), or those whose path contains `trainable`
  (e.g. "indexer": only the DSA lightning indexers, the rest frozen)."""
  return nnx.Param if not trainable else nnx.All(nnx.Param, nnx.PathContains(trainable))


def make_optimizer(model: Transformer, config: ml_collections.ConfigDict) -> nnx.Optimizer:
  """AdamW on `learning_rate(config)` after clipping the global gradient norm, over the
  parameters `trainable_params(config.trainable)` selects.

  With `optim.state_dtype` (default float32) wider than some trainable parameters (bf16), the
  optimizer keeps float32 master weights and moments for them (`master_weights`); with
  float32 parameters its state is plain AdamW's. Runs with the same `optim` settings and
  `num_steps` share one optax transformation: it is part of `train_step`'s jit cache key, so a
  second run in the process (a resume, a test) reuses the compiled step.
  """
  wrt = trainable_params(config.trainable)
  state_dtype = config.optim.get("state_dtype") or ""
  master = bool(state_dtype) and any(
      master_weights.needs_master(x.dtype, state_dtype)
      for x in jax.tree.leaves(nnx.state(model, wrt)))
  tx = _transformation(tuple(sorted(config.optim.to_dict().items())), config.num_steps, master)
  return nnx.Optimizer(model, tx, wrt=wrt)


@functools.lru_cache(maxsize=16)
def _transformation(optim: tuple[tuple[str, Any], ...], num_steps: int, master: bool = False
                    ) -> optax.GradientTransformation:
  config = ml_collections.ConfigDict(dict(optim=dict(optim), num_steps=num_steps))
  o = config.optim
  tx = optax.chain(
      optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity(),
      optax.adamw(learning_rate(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
  return master_weights.with_master_weights(tx, o.state_dtype) if master else tx


# --- steps ---------------------------------------------------------------------------------------


def layer_losses(aux: dict, aux_losses: tuple[tuple[str, float], ...]) -> dict[str, jax.Array]:
  """`{name: mean over the layers that report aux["layers"][i][name]}` for each named loss."""
  out = {}
  for name, _ in aux_losses:
    values = [layer[name] for layer in aux["layers"] if name in layer]
    out[name] = sum(values) / len(values) if values else jnp.zeros((), jnp.float32)
  return out


def token_losses(model: Transformer, batch: dict[str, jax.Array], loss_chunk: int = -1
                 ) -> tuple[jax.Array, jax.Array, dict]:
  """`(losses [B, T], argmax [B, T], aux)` of the model on `batch`, the cross-entropy computed
  `resolve_loss_chunk(loss_chunk, ...)` positions at a time (0 = from full logits)."""
  x, aux = model.hidden(batch["tokens"], segment_ids=batch["segment_ids"],
                        positions=batch.get("positions"))  # B T D
  b, t = batch["tokens"].shape
  chunk = chunked_loss.resolve_loss_chunk(loss_chunk, b, t, model.config.vocab_size)
  losses, predictions = model.token_losses(x, batch["targets"], chunk)  # B T each
  return losses, predictions, aux


def loss_fn(model: Transformer, batch: dict[str, jax.Array], lm_weight: float = 0.0,
            aux_losses: tuple[tuple[str, float], ...] = (), loss_chunk: int = -1
            ) -> tuple[jax.Array, dict]:
  """Mean cross-entropy over the scored tokens (`loss_mask`), plus `lm_weight` times the mean
  over the other in-document tokens (an auxiliary language-modelling loss; 0 = answers only),
  plus `weight * layer_losses(...)[name]` for each `(name, weight)` of `aux_losses` (losses the
  layers report in `aux`, e.g. DSA's "indexer_kl"). `loss_chunk`: see `token_losses`."""
  losses, _, aux = token_losses(model, batch, loss_chunk)  # B T
  extra = layer_losses(aux, aux_losses)
  extra_total = sum(weight * extra[name] for name, weight in aux_losses)
  mask = batch["loss_mask"]
  scored = (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  if not lm_weight:
    return scored + extra_total, {"scored_loss": scored, **extra}
  same_doc = batch.get("next_in_doc")  # set when the batch's tokens were permuted
  if same_doc is None:
    same_doc = sharding.next_in_doc(batch["segment_ids"])
  other = same_doc.astype(losses.dtype) * (1.0 - mask)
  lm = (losses * other).sum() / jnp.maximum(other.sum(), 1.0)
  return scored + lm_weight * lm + extra_total, {"scored_loss": scored, **extra}


@functools.partial(nnx.jit, static_argnames=("grad_accum", "lm_weight", "aux_losses",
                                             "trainable", "loss_chunk"))
def train_step(model: Transformer, optimizer: nnx.Optimizer, batch: dict[str, jax.Array],
               grad_accum: int = 1, lm_weight: float = 0.0,
               aux_losses: tuple[tuple[str, float], ...] = (),
               trainable: str = "", loss_chunk: int = -1) -> dict[str, jax.Array]:
  """One optimizer update on `batch` (split into `grad_accum` equal micro-batches).

  Gradients are taken only for `trainable_params(trainable)` (must match the optimizer's).
  Returns the loss that was minimised, `scored_loss` (its answers-only part), each
  auxiliary layer loss of `aux_losses`, `grad_norm`, and `applied`: False when the loss, a
  gradient, or the updated state was not finite, in which case nothing was changed
  (`update_if_finite`; the loop counts such steps and stops after `max_nonfinite_steps`).
  """
  grad_fn = nnx.value_and_grad(
      functools.partial(loss_fn, lm_weight=lm_weight, aux_losses=aux_losses,
                        loss_chunk=loss_chunk),
      argnums=nnx.DiffState(0, trainable_params(trainable)), has_aux=True)
  micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)
  loss, parts, grads = 0.0, {}, None
  for i in range(grad_accum):  # unrolled: grad_accum is small and static
    (micro_loss, aux), micro_grads = grad_fn(model, jax.tree.map(lambda x: x[i], micro))
    loss = loss + micro_loss / grad_accum
    parts = {k: parts.get(k, 0.0) + v / grad_accum for k, v in aux.items()}
    grads = micro_grads if grads is None else jax.tree.map(jnp.add, grads, micro_grads)
  grads = jax.tree.map(lambda g: g / grad_accum, grads)
  applied = update_if_finite(model, optimizer, grads, trainable_params(trainable),
                             all_finite(loss, grads))
  return {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads), "applied": applied}


def all_finite(*trees) -> jax.Array:
  """Scalar bool: every floating-point leaf of `trees` is finite (no NaN, no inf)."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def update_if_finite(model: Transformer, optimizer: nnx.Optimizer, grads, wrt,
                     finite: jax.Array) -> jax.Array:
  """`optimizer.update(model, grads)`, kept only if `finite` and the new parameters and
  optimizer state are finite too; otherwise both stay as they were (the update count that
  drives the schedule included), as `optax.apply_if_finite` does, without changing the
  optimizer state's structure (checkpoints stay compatible). Returns whether it was kept."""
  values = lambda state: jax.tree.map(lambda x: x, state)  # arrays now, not live Variables
  old_params, old_opt = values(nnx.state(model, wrt)), values(nnx.state(optimizer))
  optimizer.update(model, grads)
  new_params, new_opt = values(nnx.state(model, wrt)), values(nnx.state(optimizer))
  keep = finite & all_finite(new_params, new_opt)
  choose = lambda new, old: jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, old)
  nnx.update(model, choose(new_params, old_params))
  nnx.update(optimizer, choose(new_opt, old_opt))
  return keep


@functools.partial(nnx.jit, static_argnames=("loss_chunk",))
def eval_step(model: Transformer, batch: dict[str, jax.Array],
              loss_chunk: int = -1) -> dict[str, jax.Array]:
  """Per-row scores: `exact` (every answer token greedy-correct), `correct`/`scored` tokens, loss."""
  losses, predictions, _ = token_losses(model, batch, loss_chunk)
  mask = batch["loss_mask"] > 0
  hit = (predictions == batch["targets"]) & mask
  return {"exact": jnp.all(hit | ~mask, axis=1) & jnp.any(mask, axis=1),
          "correct": hit.sum(axis=1), "scored": mask.sum(axis=1),
          "loss": (losses * mask).sum(axis=1)}


def evaluate_batches(model: Transformer, batches, put=None,
                     loss_chunk: int = -1) -> dict[str, float]:
  """Aggregate `eval_step` over batches: exact-match accuracy, token accuracy, loss per token.

  `put` places a host batch on devices (default `to_device`; sharded runs pass theirs).
  """
  totals = {"exact": 0.0, "rows": 0, "correct": 0.0, "scored": 0.0, "loss": 0.0}
  for batch in batches:
    scores = host_values(eval_step(model, (put or to_device)(batch), loss_chunk=loss_chunk))
    totals["exact"] += float(np.sum(scores["exact"]))
    totals["rows"] += len(scores["exact"])
    for key in ("correct", "scored", "loss"):
      totals[key] += float(np.sum(scores[key]))
  scored = max(totals["scored"], 1.0)
  return {"accuracy": totals["exact"] / max(totals["rows"], 1),
          "token_accuracy": totals["correct"] / scored, "eval_loss": totals["loss"] / scored}


def host_values(tree):
  """`jax.device_get(tree)`, also for arrays sharded over several processes' devices (each
  process gets the whole global value: the rows of a data-parallel batch live on all hosts)."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def to_device(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  return {key: jnp.asarray(value) for key, value in batch.items()}


def num_params(model: Transformer) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


def tokens_per_step(config: ml_collections.ConfigDict) -> int:
  return config.batch_size * config.task.seq_len


def describe(config: ml_collections.ConfigDict, model: Transformer) -> dict[str, Any]:
  """A one-line summary of the run for logs."""
  return {"params": num_params(model), "layers": list(model.config.layer_kinds),
          "tokens_per_step": tokens_per_step(config)}
