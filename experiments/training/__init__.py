"""Training runs: the loop (`loop.py`: setup, steps, resume, metrics), models and optimizers from
a config with the jitted steps (`trainer.py`), orbax checkpoints (`checkpoints.py`), workdir
safety (`workdir.py`: lock, logs, refused config changes), meshes and sharding
(`sharding.py`), command-line parsing (`cli.py`) and the figures' plumbing (`plots.py`).

May import `experiments.data`, `experiments.configs`, `models` and `attention`; never
`experiments.evaluation`, `experiments.bench`, `experiments.rows` or the commands.
"""
