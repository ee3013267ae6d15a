"""The results rows: one module per research question, each defining `ROW` (`base.Row`).

`runner.py` runs them (`python -m experiments.reproduce`) and writes `experiments/results/`;
`base.py` holds what the rows share, `grids.py` the grid tables and plots, `dsa.py` the
dense -> sparse training chain. Rows may import every other part of `experiments` (data,
training, evaluation, bench, configs), `models` and `attention`; nothing but the `reproduce`
command imports the rows.
"""
