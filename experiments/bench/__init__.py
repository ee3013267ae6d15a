"""Measurements: the attention benchmark table (`attention_bench.py`) and its presets
(`presets.py`), timing helpers (`timing.py`), decode steps against reading the cache
(`decode_bench.py`), the DSA and MLM cost measurements (`dsa_bench.py`, `mlm_cost.py`), and
the two GPU check scripts (`gpu_check.py`, `dsa_gpu_check.py`, with what they share in
`gpu_run.py`), which run as commands of their own: `python -m experiments.bench.gpu_check`.

May import `experiments.training` (plots, cli, trainer), `experiments.configs`, `models` and
`attention`; never `experiments.rows`, `experiments.evaluation` or the commands. The GPU scripts
import only jax, numpy, absl and `attention` (a test blocks every other import).
"""
