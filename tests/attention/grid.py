"""The shared test grid: shapes x masks x dtypes that every attention implementation runs.

One list of `Case`s (shapes, causal / window / segments / offsets / GQA / odd lengths); the
tolerance table is `tests.helpers.ATOL` (DESIGN.md). `test_grid.py` runs each implementation
(`IMPLEMENTATIONS` there) over the cases it supports, forward and gradients, against
`reference_attention`; a new backend is one entry there, not a new list of cases.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attention import Mask, geometric_alibi_slopes
from tests.helpers import random_qkv, random_segments

# Cases short enough for the Pallas interpret mode (and for the slower implementations).
SMALL_LEN = 128


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  batch: int = 2
  q_len: int = 64
  kv_len: int = 64
  heads: int = 4
  kv_heads: int = 2
  head_dim: int = 32
  causal: bool = False
  window: tuple[int, int] | None = None
  segments: int = 0  # number of segments (0: none); the last 5 positions are padding
  q_offset: int | tuple[int, ...] = 0
  # Contract options (FEATURES): soft-cap, v head dim (None: head_dim), ALiBi, return_lse.
  soft_cap: float | None = None
  value_dim: int | None = None
  alibi: bool = False
  lse: bool = False
  sinks: int = 0  # Mask.sinks
  sink_logits: bool = False  # learned per-head sink logits
  seed: int = 0  # of the random inputs (the fuzzed cases draw it)

  @property
  def features(self) -> frozenset[str]:
    """The optional contract features this case exercises (a subset of FEATURES)."""
    return frozenset(name for name, on in (
        ("soft_cap", self.soft_cap is not None), ("value_dim", self.value_dim is not None),
        ("alibi", self.alibi), ("lse", self.lse), ("sinks", self.sinks > 0),
        ("sink_logits", self.sink_logits)) if on)

  def options(self) -> dict:
    """Keyword options of the attention call (and of the reference) for this case."""
    options = {}
    if self.soft_cap is not None:
      options["logits_soft_cap"] = self.soft_cap
    if self.alibi:
      options["alibi_slopes"] = jnp.asarray(geometric_alibi_slopes(self.heads))
    if self.lse:
      options["return_lse"] = True
    if self.sink_logits:  # some below, some above the rows' typical lse
      options["sink_logits"] = jnp.linspace(-1.0, 3.0, self.heads, dtype=jnp.float32)
    return options

  @property
  def small(self) -> bool:
    return max(self.q_len, self.kv_len) <= SMALL_LEN

  @property
  def self_attention(self) -> bool:
    """Queries are the keys' positions (T == S, offset 0): what ring attention shards."""
    return self.q_len == self.kv_len and self.q_offset == 0

  def inputs(self, dtype=jnp.float32, seed: int | None = None):
    """Fresh random `(q, k, v, mask)` of this case (`seed`: default the case's own)."""
    seed = self.seed if seed is None else seed
    q, k, v = random_qkv(seed, self.batch, self.q_len, self.kv_len, self.heads, self.kv_heads,
                         self.head_dim, dtype)
    if self.value_dim is not None:
      v = jax.random.normal(jax.random.key(seed + 1), (*v.shape[:3], self.value_dim)).astype(dtype)
    q_seg = kv_seg = None
    if self.segments:
      assert self.q_len == self.kv_len
      q_seg = kv_seg = random_segments(seed, self.batch, self.q_len, self.segments,
                                       pad=min(5, self.q_len // 10))
    offset = jnp.asarray(self.q_offset, jnp.int32) if isinstance(self.q_offset, tuple) else (
        self.q_offset)
    mask = Mask(causal=self.causal, window=self.window, q_segment_ids=q_seg,
                kv_segment_ids=kv_seg, q_offset=offset, sinks=self.sinks)
    return q, k, v, mask


CASES = [
    Case("full"),
    Case("causal", causal=True),
    Case("diagonal", window=(0, 0)),
    Case("window_3_0", causal=True, window=(3, 0)),
    Case("window_64_64", q_len=128, kv_len=128, window=(64, 64), batch=1),
    Case("segments_causal", causal=True, segments=3),
    Case("segments_bidir", q_len=96, kv_len=96, heads=2, kv_heads=1, segments=4),
    Case("segments_window", window=(20, 9), segments=4),
    Case("gqa_8_2", heads=8, kv_heads=2, causal=True),
    Case("mqa", heads=4, kv_heads=1, window=(10, 10)),
    Case("len_1", q_len=1, kv_len=1, causal=True),
    Case("len_7", q_len=7, kv_len=7, causal=True),
    Case("len_100", q_len=100, kv_len=100, causal=True, window=(40, 0), batch=1),
    Case("cross_attn", q_len=37, kv_len=100, heads=4, kv_heads=4),
    Case("decode_offset", q_len=7, kv_len=100, causal=True, q_offset=93),
    Case("chunk_offsets", q_len=32, kv_len=96, causal=True, window=(47, 0), q_offset=(64, 50)),
    Case("no_key_rows", q_len=24, kv_len=40, causal=True, q_offset=-5),
    Case("head_dim_64", head_dim=64, causal=True, batch=1),
    Case("head_dim_24", head_dim=24, window=(8, 8), batch=1),
    # Longer: several XLA tiles, the banded path, default tiles (XLA implementations only).
    Case("causal_1000", batch=1, q_len=1000, kv_len=1000, heads=2, kv_heads=2, causal=True),
    Case("band_127_0", batch=1, q_len=1000, kv_len=1000, heads=2, kv_heads=1, head_dim=64,
         causal=True, window=(127, 0)),
    Case("window_64_64_300", batch=1, q_len=300, kv_len=300, heads=2, kv_heads=1, head_dim=64,
         window=(64, 64)),
    Case("segments_200", q_len=200, kv_len=200, causal=True, segments=4),
    Case("segments_window_200", q_len=200, kv_len=200, heads=2, kv_heads=2, causal=True,
         window=(16, 0), segments=4),
    Case("prefill_window", batch=1, q_len=40, kv_len=170, causal=True, window=(31, 0),
         q_offset=130),
    Case("head_dim_128", batch=1, q_len=100, kv_len=100, heads=2, kv_heads=1, head_dim=128,
         causal=True),
    # Contract options, one small case each (+ one long case through the XLA banded path).
    Case("lse_no_key_rows", q_len=24, kv_len=40, causal=True, q_offset=-5, lse=True),
    Case("soft_cap_segments", causal=True, segments=3, soft_cap=1.5),
    Case("value_dim_offsets", q_len=32, kv_len=96, causal=True, window=(47, 0), q_offset=(64, 50),
         value_dim=48),
    Case("alibi_bidir_segments", window=(20, 9), segments=4, alibi=True),
    Case("alibi_decode_all", q_len=7, kv_len=100, causal=True, q_offset=93, alibi=True,
         soft_cap=2.0, lse=True, value_dim=16),
    Case("band_all_features", batch=1, q_len=200, kv_len=200, heads=2, kv_heads=1, causal=True,
         window=(15, 0), alibi=True, soft_cap=2.0, lse=True, value_dim=16),
    # Attention sinks: Mask.sinks (windows with the first keys, causal and not; sinks over more
    # than one Pallas tile; decode from a long cache) and learned sink logits.
    Case("sinks_window", causal=True, window=(7, 0), q_offset=-3, sinks=5, sink_logits=True,
         lse=True),  # the first 3 rows see no key: out 0, lse = the sink logit
    Case("sinks_bidir_segments", window=(5, 5), sinks=20, segments=3),
    Case("sinks_decode_all", q_len=7, kv_len=100, causal=True, window=(20, 0),
         q_offset=(93, 60), sinks=4, sink_logits=True, lse=True),
    Case("sinks_200", batch=1, q_len=200, kv_len=200, heads=2, kv_heads=1, causal=True,
         window=(20, 0), sinks=4, sink_logits=True, lse=True, soft_cap=2.0),
]
FEATURES = frozenset({"soft_cap", "value_dim", "alibi", "lse", "sinks", "sink_logits"})
BY_NAME = {c.name: c for c in CASES}
# Cases also run in bfloat16 and float16; the feature cases also in bfloat16.
DTYPE_CASES = ("causal", "segments_causal", "chunk_offsets", "gqa_8_2")
BF16_CASES = ("lse_no_key_rows", "soft_cap_segments", "value_dim_offsets", "alibi_bidir_segments")
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


def case_dtypes(cases) -> list[tuple[Case, str]]:
  """`(case, dtype name)` pairs: every case in float32, the DTYPE_CASES also in bf16 / f16,
  the BF16_CASES also in bf16."""
  out = [(c, "f32") for c in cases]
  out += [(c, d) for d in ("bf16", "f16") for c in cases if c.name in DTYPE_CASES]
  out += [(c, "bf16") for c in cases if c.name in BF16_CASES]
  return out
