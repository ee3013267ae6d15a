"""What a run's `--workdir` guarantees: one writer at a time, a readable log, a config history.

    workdir = prepare(path)                       # created, writable, else WorkdirError
    with lock(workdir):                           # train: exclusive for the run's whole life
      ...
    with lock(workdir, shared=True):              # evaluate: readers may overlap each other
      ...

The lock is `fcntl.flock` on `<workdir>/.lock`: the kernel releases it when the process exits,
however it exits (a crash or `kill -9` included), so a stale lock cannot block the next run.
A second run into a busy workdir stops at once with `WorkdirBusy`, naming the holder's pid.

`config_changes` compares the fields of a saved `config.json` that change what is computed
(`COMPUTATION_FIELDS`) with the current config; train.py refuses a resume that changes them
unless `allow_config_change`, and then `record_config_change` appends the change to
`config_history.jsonl` (one JSON line per resume: step, and each field's old and new value).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import traceback
from typing import Any, Iterator

LOCK_FILE = ".lock"
LOG_FILE = "train.log"
HISTORY_FILE = "config_history.jsonl"

# Config fields whose change alters the computation a checkpoint came from (the data order,
# the model, the loss, the optimizer and its schedule). Dotted prefixes: "model" covers all of
# config.model. Bookkeeping fields (log/eval/checkpoint intervals, mesh, progress) may change.
COMPUTATION_FIELDS = ("seed", "task", "model", "optim", "batch_size", "grad_accum", "num_steps",
                      "lm_loss_weight", "aux_losses", "trainable")
# Fields added after runs were saved: a config.json without one computed with this value.
ADDED_FIELDS = {
    "task.tokenizer": "bytes",
    "optim.state_dtype": "float32",  # float32 parameters: the same AdamW state either way
    **{f"model.{name}": value for name, value in dict(
        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_mscale=None,
        rope_truncate=True, qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=None,
        post_norms=False, first_attn_norm=True, embed_norm=False, embed_scale=1.0,
        attention_scale=None, final_logit_soft_cap=None, output_bias=False,
        mlm_head_bias=False, mlm_activation="gelu_tanh", init_std=0.02, norm_eps=1e-6,
        scan_layers=True, mlp_chunk=0).items()},
}
# Values saved under an older meaning: the same computation as the new value.
RENAMED_VALUES = {"model.remat": {True: "block", False: "none"}}


class WorkdirError(RuntimeError):
  """The workdir cannot be created or written."""


class WorkdirBusy(WorkdirError):
  """Another process holds the workdir's lock."""


def prepare(workdir: str) -> str:
  """Creates `workdir` and checks it is writable; returns its absolute path.

  Raises `WorkdirError` with the reason (missing flag, a file in the way, no permission).
  """
  if not workdir:
    raise WorkdirError("--workdir is required: the directory where the run writes its files.")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  probe = os.path.join(workdir, f".write_test.{os.getpid()}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not writable ({type(e).__name__}: {e.strerror or e})"
                       f"; pass a --workdir you can write to.") from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"workdir {workdir} is not writable; pass a --workdir you can write to.")
  return workdir


@contextlib.contextmanager
def lock(workdir: str, *, shared: bool = False) -> Iterator[None]:
  """Holds `<workdir>/.lock` (exclusive, or `shared` with other readers) for the block.

  Never waits: a held lock raises `WorkdirBusy` at once, naming the holder's pid (each
  holder writes its pid and command into the file; a reader that finds a writer's pid there
  names it). Released when the block ends or the process dies.
  """
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown pid"
      raise WorkdirBusy(
          f"workdir {workdir} is in use by another process ({holder}); wait for it to finish "
          f"or pass another --workdir. (Lock: {path}, released when its holder exits.)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv[:1])}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # closing the descriptor releases the flock


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename: a reader (or a run killed
  mid-write, then resumed) sees the old content or the new one, never a torn file."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


_process = 0  # this process's index in a multi-host run (`set_process`), else 0


def set_process(index: int) -> None:
  """Called by the training loop once the processes of a multi-host run have connected: from
  then on this process logs to its own file (`log_path`)."""
  global _process  # pylint: disable=global-statement
  _process = int(index)


def log_path(workdir: str) -> str:
  """This process's log: `<workdir>/train.log`, or `train.process<k>.log` for process k > 0
  of a multi-host run (every host appends only to its own file: appends from several hosts to
  one file on a shared filesystem interleave or tear)."""
  return os.path.join(workdir, LOG_FILE if _process == 0 else f"train.process{_process}.log")


class _ProcessLog(logging.Handler):
  """Appends records to `log_path(workdir)`, reopening when it changes (the processes of a
  multi-host run learn their index after the handler is added: `set_process`)."""

  def __init__(self, workdir: str):
    super().__init__(logging.INFO)
    self.workdir, self.path, self.file = workdir, None, None

  def emit(self, record: logging.LogRecord) -> None:
    try:
      path = log_path(self.workdir)
      if path != self.path:
        self.close_file()
        self.path, self.file = path, open(path, "a")  # pylint: disable=consider-using-with
      self.file.write(self.format(record) + "\n")
      self.file.flush()
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)

  def close_file(self) -> None:
    if self.file is not None:
      self.file.close()
      self.file = None

  def close(self) -> None:
    self.close_file()
    super().close()


def log_to_file(workdir: str) -> logging.Handler:
  """Adds a handler writing every log record (INFO and up, all libraries) to this process's
  log (`log_path`: `train.log` on one host)."""
  handler = _ProcessLog(workdir)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  logging.getLogger().addHandler(handler)
  return handler


def stop_logging(handler: logging.Handler) -> None:
  logging.getLogger().removeHandler(handler)
  handler.close()


def log_exception(workdir: str | None, error: BaseException) -> str | None:
  """Appends `error`'s full traceback to this process's log (`log_path`); returns its path."""
  if not workdir or not os.path.isdir(workdir):
    return None
  path = log_path(workdir)
  with open(path, "a") as f:
    f.write("".join(traceback.format_exception(error)))
  return path


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
  return out


def _normal(value: Any) -> Any:
  return json.loads(json.dumps(value)) if isinstance(value, (tuple, list)) else value


def config_changes(saved: dict[str, Any], current: dict[str, Any]
                   ) -> list[tuple[str, Any, Any]]:
  """`(field, saved value, current value)` for each `COMPUTATION_FIELDS` leaf that differs."""
  old, new = _flatten(saved), _flatten(json.loads(json.dumps(current)))
  old = {**{k: v for k, v in ADDED_FIELDS.items() if k in new}, **old}
  old.update({k: RENAMED_VALUES[k].get(v, v) for k, v in old.items() if k in RENAMED_VALUES})
  keep = lambda path: any(path == f or path.startswith(f + ".") for f in COMPUTATION_FIELDS)
  return [(path, old.get(path), new.get(path)) for path in sorted(set(old) | set(new))
          if keep(path) and _normal(old.get(path)) != _normal(new.get(path))]


def format_changes(changes: list[tuple[str, Any, Any]]) -> str:
  return "; ".join(f"{path}: {old!r} -> {new!r}" for path, old, new in changes)


def record_config_change(workdir: str, step: int, changes: list[tuple[str, Any, Any]]) -> None:
  """Appends `{"step", "changes": [{"field", "old", "new"}]}` to `config_history.jsonl`."""
  row = dict(step=step, changes=[dict(field=p, old=o, new=n) for p, o, n in changes])
  with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
    f.write(json.dumps(row) + "\n")
