"""The Triton IR of Pallas kernels, from the CUDA lowering on a CPU-only machine (test helper).

`jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))` embeds each Pallas Triton kernel
as a `__gpu$xla.gpu.triton` custom call whose `ir` attribute holds the kernel's Triton module
as MLIR bytecode (jaxlib <= 0.10.2). `triton_kernels` parses them back to text, e.g.

    tt.dot %a, %b, %acc, inputPrecision = tf32 : tensor<64x32xf32> * tensor<32x64xf32> -> ...

(the text elides the default `ieee`; `Kernel.dots` reads the attribute itself), so tests can
assert what the GPU compiler will be given (tensor-core dots, their input precision, no
atomics) without a GPU. Newer jaxlibs embed an already compiled kernel (`triton_kernel_call`)
instead; there the helper skips the calling test.

This reads JAX internals (`jax._src`): the Triton dialect has no public Python binding.
"""

from __future__ import annotations

import jax
import pytest

TRITON_CALL = "__gpu$xla.gpu.triton"


# Triton's InputPrecision enum (the text form elides the default, ieee).
_INPUT_PRECISION = {0: "tf32", 1: "tf32x3", 2: "ieee", 3: "bf16x3", 4: "bf16x6"}


class Kernel:
  """One kernel's Triton module: `text`, `ops` (every op name, in order) and `dots`, one
  `(input precision, lhs type, rhs type)` per `tt.dot`, e.g. `("ieee", "tensor<64x32xf32>", ...)`.
  """

  def __init__(self, module):
    self.text = str(module)
    self.ops, self.dots = [], []
    for op in _walk(module.operation):
      self.ops.append(op.name)
      if op.name == "tt.dot":
        precision = int(str(op.attributes["inputPrecision"]).split(":")[0])
        self.dots.append((_INPUT_PRECISION[precision], str(op.operands[0].type),
                          str(op.operands[1].type)))


def _walk(op):
  for region in op.regions:
    for block in region.blocks:
      for child in block.operations:
        yield child.operation
        yield from _walk(child.operation)


def triton_kernels(fn, *args) -> dict[str, Kernel]:
  """`{"name#i": Kernel}` for every Pallas kernel in `jax.jit(fn)(*args)`, in lowering order."""
  from jax._src.interpreters import mlir as jax_mlir  # pylint: disable=g-import-not-at-top
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
  try:
    from jax._src.lib.triton import dialect as tt_dialect  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    pytest.skip("this jaxlib has no Triton dialect bindings")
  lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  module = lowered.compiler_ir("stablehlo")
  kernels = {}
  context = jax_mlir.make_ir_context()
  tt_dialect.register_dialect(context)
  for call in _walk(module.operation):
    if call.name != "stablehlo.custom_call" or (
        ir.StringAttr(call.attributes["call_target_name"]).value != TRITON_CALL):
      continue
    config = ir.DictAttr(call.attributes["mhlo.backend_config"])
    name = ir.StringAttr(config["name"]).value
    with context:
      kernels[f"{name}#{len(kernels)}"] = Kernel(
          ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes))
  if not kernels:
    pytest.skip(f"no {TRITON_CALL} custom call: this jaxlib compiles Triton at lowering time")
  return kernels
