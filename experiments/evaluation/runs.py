"""Loading a finished training run and evaluating it: what `python -m experiments.evaluate`
does with its flags.

    config, model, step = load_run(workdir, "yarn", 4.0)   # RoPE override: context extension
    run(workdir, length_multiples=[1, 2, 4], tag="long")    # under the workdir's shared lock
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import logging
import ml_collections

from experiments.evaluation import report, scores
from experiments.training import checkpoints as ckpt_lib
from experiments.training import hf_bridge, trainer
from experiments.training import workdir as workdir_lib


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run saved in `<workdir>/config.json`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a training run's workdir.")
  with open(path) as f:
    data = json.load(f)
  data.pop("resolved", None)  # written for readers by loop.write_config
  return ml_collections.ConfigDict(data)


def load_run(workdir: str, rope_scaling: str | None = None, rope_factor: float | None = None,
             model_overrides: dict[str, Any] | None = None, step: int | None = None
             ) -> tuple[ml_collections.ConfigDict, Any, int]:
  """(config, model with the weights of checkpoint `step` (None: the latest), step) of a run.

  `rope_scaling`/`rope_factor` override the trained RoPE (inference-time context extension);
  the original length L of `yarn` is the training length unless the run already had one.
  `model_overrides` sets other parameter-free `ModelConfig` fields (e.g. `rope_yarn_beta`).
  """
  config = load_config(workdir)
  overrides = dict(model_overrides or {})
  if rope_scaling is not None or rope_factor is not None:
    overrides.update(rope_scaling=rope_scaling or config.model.rope_scaling,
                     rope_factor=float(rope_factor or config.model.rope_factor),
                     rope_original_length=(config.model.rope_original_length
                                           or config.task.seq_len))
  model = trainer.make_model(config, **overrides)
  step = ckpt_lib.load_params(model, workdir, step)
  return config, model, step


def default_tag(rope_scaling: str | None, rope_factor: float | None, lengths: Sequence[int],
                examples: int | None) -> str:
  """What an evaluation computed, as a file-name part: `yarn4_256-512-1024_n8` (`trained`:
  the run's own RoPE)."""
  rope = f"{rope_scaling or 'trained'}{f'{rope_factor:g}' if rope_factor else ''}"
  return f"{rope}_{'-'.join(map(str, lengths))}" + (f"_n{examples}" if examples else "")


def grid_settings(config: ml_collections.ConfigDict, *, task_names=None, length_multiples=None,
                  lengths=None, examples=None, rope_scaling=None, rope_factor=None, tag: str = ""
                  ) -> tuple[list[str], list[int], str]:
  """`(task names, lengths, tag)` of an evaluation: the flags' values, else the config's grid
  (`eval.tasks`, `eval.length_multiples` x `task.seq_len`); the tag says what was evaluated."""
  multiples = length_multiples or config.eval.length_multiples
  lengths = [int(x) for x in lengths or [float(m) * config.task.seq_len for m in multiples]]
  names = list(task_names or config.eval.tasks)
  return names, lengths, tag or default_tag(rope_scaling, rope_factor, lengths, examples)


def run(workdir: str, *, outdir: str | None = None, task_names: Sequence[str] | None = None,
        length_multiples: Sequence[float] | None = None, lengths: Sequence[int] | None = None,
        depths: Sequence[float] | None = None, examples: int | None = None,
        rope_scaling: str | None = None, rope_factor: float | None = None, tag: str = "",
        overwrite: bool = False, check_rows: int = 4) -> dict[str, list[dict[str, Any]]]:
  """Evaluates run `workdir` (under its shared lock); what `main` does with the flags."""
  workdir = os.path.abspath(workdir)
  with workdir_lib.lock(workdir, shared=True):
    config = load_config(workdir)
    names, lengths, tag = grid_settings(
        config, task_names=task_names, length_multiples=length_multiples, lengths=lengths,
        examples=examples, rope_scaling=rope_scaling, rope_factor=rope_factor, tag=tag)
    outdir = outdir or workdir
    report.check_outputs(outdir, names, tag, overwrite)  # before the model is built
    config, model, step = load_run(workdir, rope_scaling, rope_factor)
    logging.info("Loaded %s at step %d.", workdir, step)
    os.makedirs(outdir, exist_ok=True)
    if check_rows and config.model.causal:  # KV-cache decoding: decoders only
      agree = scores.check_generate(model, config, names[0], config.task.seq_len, check_rows)
      print(f"KV-cache greedy decoding agrees with teacher-forced scoring on {agree:.0%} of "
            f"rows.")
    return report.evaluate_and_report(
        model, config, outdir, task_names=names, lengths=lengths,
        depths=[float(d) for d in depths] if depths else None, examples=examples, tag=tag,
        overwrite=overwrite)


def run_hf(path: str, config: ml_collections.ConfigDict, *, outdir: str,
           depths: Sequence[float] | None = None, examples: int | None = None,
           overwrite: bool = False, **grid) -> dict[str, list[dict[str, Any]]]:
  """Evaluates the Hugging Face checkpoint at `path` directly, on `config`'s tasks and grid
  (its model section and tokenizer from the checkpoint: `training.hf_bridge`); `grid`:
  `grid_settings`'s arguments. Writes under `outdir` (never overwriting)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.init_from = os.path.abspath(path)
  config = hf_bridge.with_checkpoint_model(config)
  names, lengths, tag = grid_settings(config, examples=examples, **grid)
  report.check_outputs(outdir, names, tag, overwrite)
  model = hf_bridge.load_model(config)
  os.makedirs(outdir, exist_ok=True)
  return report.evaluate_and_report(
      model, config, outdir, task_names=names, lengths=lengths,
      depths=[float(d) for d in depths] if depths else None, examples=examples, tag=tag,
      overwrite=overwrite)
