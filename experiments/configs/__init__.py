"""Experiment configs (ml_collections): one file per experiment, whose docstring is its command.

`common.py` is the schema every config starts from (all fields, defaults, meanings, variants);
each other file calls `common.base_config()` and changes what it needs, with `runlocal`-style
`smoke` variants for the tests. Configs may import `experiments.data` (task constants) and
`models`; never `experiments.training`, `evaluation`, `bench`, `rows` or the commands.
"""
