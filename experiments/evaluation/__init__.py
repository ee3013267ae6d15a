"""Evaluating trained models: scores (`scores.py`), tables/CSV/plots (`report.py`) and finished
runs loaded from their workdir (`runs.py`).

May import `experiments.training`, `experiments.data`, `experiments.configs`, `models` and
`attention`; never `experiments.rows`, `experiments.bench` or the commands.
`train_and_evaluate` (training, then the evaluation grid) is what `python -m
experiments.train` runs.
"""

from experiments.evaluation.report import evaluate_and_report, train_and_evaluate
from experiments.evaluation.runs import load_config, load_run

__all__ = ["evaluate_and_report", "load_config", "load_run", "train_and_evaluate"]
