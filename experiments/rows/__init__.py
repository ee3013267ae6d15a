"""The rows of README "Results": one module per row, each defining `ROW` (`base.Row`).

`experiments/reproduce.py` runs them; `base.py` holds what the rows share.
"""
