"""Command-line parsing shared by the entry points (train, evaluate, benchmark).

One way to define and read flags: each entry point defines its flags in `define_flags()`,
called under `if __name__ == "__main__":` (so modules import each other without defining a flag
twice), starts with `app.run(main, flags_parser=cli.parse_flags)`, and its `main` reads `FLAGS`
and calls importable functions that take plain arguments.

`parse_flags` differs from absl's in two ways a researcher sees:
* `--help` / `-h` / `--helpshort` / `--helpfull` print the help and exit with status 0 (absl
  exits 1); with a `--config` flag, `--helpfull` also lists every config field.
* a bad flag prints one line, `error: ...`, and exits with status 2; an unknown
  `--config.field` names the nearest known fields (no ml_collections traceback).
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import flags

from experiments.configs import common

FLAGS = flags.FLAGS
HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull")
OVERRIDE = "--config."


def parse_flags(argv: Sequence[str]) -> list[str]:
  """`FLAGS(argv)` with the help and error behaviour above; returns the remaining argv."""
  args = list(argv[1:])
  if any(a in HELP for a in args):
    print(help_text(argv, full="--helpfull" in args))
    sys.exit(0)
  try:
    return FLAGS(list(argv))
  except Exception as e:  # noqa: BLE001 - flags.Error, or ml_collections on a bad override
    print(f"error: {flag_error(argv, e)}", file=sys.stderr)
    sys.exit(2)


def help_text(argv: Sequence[str], full: bool) -> str:
  """absl's help for the main module (all modules' flags if `full`), plus the config fields."""
  text = FLAGS.get_help() if full else FLAGS.main_module_help()
  config = _config_without_overrides(argv, drop=HELP)
  if full and config is not None:
    text += "\n\nConfig fields (set any with --config.FIELD=VALUE):\n" + (
        common.describe_fields(config))
  elif config is not None:
    text += "\n\n--helpfull or --print_config lists every config field."
  return text


def flag_error(argv: Sequence[str], error: Exception) -> str:
  """One line for a failed parse: unknown config fields with the nearest names, or the error."""
  names = [a[len(OVERRIDE):].split("=", 1)[0] for a in argv[1:] if a.startswith(OVERRIDE)]
  config = _config_without_overrides(argv, drop=()) if names else None
  if config is not None:
    known = common.field_paths(config.to_dict())
    unknown = [n for n in names if n not in known]
    if unknown:
      return common.unknown_fields_message(unknown, known)
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  return text if isinstance(error, flags.Error) else f"{type(error).__name__}: {text}"


def _config_without_overrides(argv: Sequence[str], drop: Sequence[str]):
  """The `--config` of `argv` with no `--config.x=y` applied (None: no such flag, or broken)."""
  if "config" not in FLAGS:
    return None
  kept = [argv[0]] + [a for a in argv[1:] if not a.startswith(OVERRIDE) and a not in drop]
  saved_argv, sys.argv = sys.argv, kept  # ml_collections also reads overrides from sys.argv
  try:
    FLAGS.unparse_flags()
    FLAGS(kept)
    return FLAGS.config
  except Exception:  # noqa: BLE001 - the config file itself is broken: say only the error
    return None
  finally:
    sys.argv = saved_argv
