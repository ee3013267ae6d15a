"""longctx experiments: the commands at the top, the library they call in named subpackages.

Commands (thin: flags, then one call into the library; nothing imports them):

    python -m experiments.train      --config=experiments/configs/NAME.py --workdir=DIR
    python -m experiments.evaluate   --workdir=DIR
    python -m experiments.reproduce  --rows=N --workdir=DIR
    python -m experiments.benchmark  --preset=NAME
    python -m experiments.tokenize   --input=GLOB --tokenizer=DIR --output=DIR

Library, layered (each may import those below it, checked by import-linter in setup.cfg):
`rows/` (the results rows) > `evaluation/` | `bench/` > `training/` > `configs/` > `data/`.
"""
