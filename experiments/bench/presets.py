"""Benchmark presets: name -> what `python -m experiments.benchmark --preset=NAME` measures.

    python -m experiments.benchmark                        # "default": the attention table
    python -m experiments.benchmark --preset=acceptance    # the figures of attention/README.md
    python -m experiments.benchmark --preset=decode        # decode steps vs reading the cache
    python -m experiments.benchmark --preset=dsa_decode    # one DSA decode step vs dense
    python -m experiments.benchmark --preset=memory128k    # a 1B model's train step, 8K-128K
    python -m experiments.benchmark --preset=sparse        # MoBA / NSA fwd+bwd vs flash

A registry, as attention functions and layer kinds are: a new measurement is one decorated
function of the command's flag values (`values`: flag name -> value; `explicit`: the flags the
user set on the command line, which a preset's own defaults never override).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from experiments.bench import attention_bench, decode_bench, dsa_bench, memory_bench, sparse_bench

Values = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Preset:
  help: str
  run: Callable[[Values, frozenset[str]], None]


PRESETS: dict[str, Preset] = {}


def preset(name: str, help_text: str):
  """Registers `fn(values, explicit)` as preset `name`."""

  def decorator(fn):
    if name in PRESETS:
      raise ValueError(f"benchmark preset {name!r} is already registered.")
    PRESETS[name] = Preset(help_text, fn)
    return fn

  return decorator


def run(name: str, values: Values, explicit: frozenset[str] = frozenset()) -> None:
  """Runs preset `name`; a `ValueError` lists the presets for an unknown name."""
  if name not in PRESETS:
    raise ValueError(f"unknown benchmark preset {name!r}; presets: {sorted(PRESETS)}.")
  PRESETS[name].run(values, frozenset(explicit))


@preset("default", "the attention table: --methods x --causal x --lengths (memory, FLOPs, time)")
def attention_table(values: Values, explicit: frozenset[str]) -> None:
  del explicit
  fields = {f.name for f in dataclasses.fields(attention_bench.Settings)}
  settings = attention_bench.Settings(**{k: v for k, v in values.items() if k in fields})
  attention_bench.run(list(values["methods"]), [int(t) for t in values["lengths"]],
                      [c.lower() in ("1", "true", "yes") for c in values["causal"]], settings,
                      values["workdir"])


# The lengths and methods behind the performance table of attention/README.md, in one run.
ACCEPTANCE = dict(methods=["jax", "flash", "local"], causal=["false", "true"],
                  lengths=["4096", "8192", "32768", "131072"], window=256, time_max_len=32768,
                  time_bwd_max_len=8192, quadratic_max_len=32768, quadratic_time_max_len=8192)


@preset("acceptance", "the attention performance table (4096-131072 tokens; "
        "attention/README.md)")
def acceptance(values: Values, explicit: frozenset[str]) -> None:
  attention_table({**values, **{k: v for k, v in ACCEPTANCE.items() if k not in explicit}},
                  explicit)


DECODE_LENGTHS = ("8192", "32768", "131072")


@preset("decode", "dense and DSA decode steps vs reading the cache once, 8K-131072 tokens, "
        "batch 1/8, 1/8 kv heads (experiments/bench/decode_bench.py); --lengths, --dtype, "
        "--repeats (rounds, at least 3)")
def decode(values: Values, explicit: frozenset[str]) -> None:
  lengths = values["lengths"] if "lengths" in explicit else DECODE_LENGTHS
  decode_bench.run([int(s) for s in lengths], decode_bench.Shape(dtype=values["dtype"]),
                   rounds=max(3, values["repeats"]), workdir=values["workdir"],
                   echo=lambda line: print(line, flush=True))


@preset("dsa_decode", "one DSA decode step vs dense at a 131072-token cache "
        "(experiments/bench/dsa_bench.py)")
def dsa_decode(values: Values, explicit: frozenset[str]) -> None:
  del explicit
  print(dsa_bench.decode_step_table(131072, rounds=max(3, values["repeats"])), flush=True)


@preset("dsa_fp8", "FP8 indexer top-k agreement table (experiments/bench/dsa_bench.py)")
def dsa_fp8(values: Values, explicit: frozenset[str]) -> None:
  del values, explicit
  print(dsa_bench.fp8_agreement_table(4096, 512), flush=True)


MEMORY_LENGTHS = ["8192", "32768", "131072"]


@preset("memory128k", "compiled memory of a Llama-3.2-1B-shaped train step at 8K-128K tokens: "
        "dense, flash, remat, chunked loss, seq:8 ring (experiments/bench/memory_bench.py)")
def memory128k(values: Values, explicit: frozenset[str]) -> None:
  memory_bench.ask_for_host_devices(8)  # before anything initialises the backend
  lengths = values["lengths"] if "lengths" in explicit else MEMORY_LENGTHS
  memory_bench.run([int(t) for t in lengths], values["workdir"])


@preset("sparse", "MoBA and NSA forward+backward vs causal flash at 8192 and 32768 tokens, "
        "DSA's 2048-key budget (experiments/bench/sparse_bench.py)")
def sparse(values: Values, explicit: frozenset[str]) -> None:
  lengths = [int(t) for t in values["lengths"]] if "lengths" in explicit else (8192, 32768)
  print(sparse_bench.sparse_table(lengths, rounds=max(1, values["repeats"])), flush=True)
