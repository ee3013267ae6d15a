"""Resume checks: values saved under an older meaning compare equal to their new spelling."""

from __future__ import annotations

from experiments.training import workdir


def test_a_saved_boolean_remat_resumes_as_its_policy_name():
  """A run saved with `remat: false` / `true` (config.json) resumes with "none" / "block"
  without a config change; another policy is a change (experiments/training/workdir.py)."""
  saved = {"model": {"remat": False}}
  assert workdir.config_changes(saved, {"model": {"remat": "none"}}) == []
  assert workdir.config_changes({"model": {"remat": True}}, {"model": {"remat": "block"}}) == []
  assert workdir.config_changes(saved, {"model": {"remat": "dots"}}) == [
      ("model.remat", "none", "dots")]
