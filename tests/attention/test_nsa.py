"""NSA's compressed branch and block selection (attention/nsa.py) against a NumPy transcription
of the paper's formulas (Yuan et al. 2025, eqs. 7-11): values, the selected blocks, GQA
sharing, forced initial/local blocks, q_offset, segments; the chunked gradient; refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import Mask
from attention import nsa
from tests.helpers import assert_close, random_qkv, random_segments


def paper_nsa_compressed(q, k_cmp, v_cmp, *, kv_len, l, d, ls, top_n, initial, local,
                         q_offset=0, segments=None):
  """float64 loops: `(out [B, T, N, H], selected block sets [B, T, K])`."""
  q, k_cmp, v_cmp = (np.asarray(x, np.float64) for x in (q, k_cmp, v_cmp))
  b, t, n, h = q.shape
  c, kh = k_cmp.shape[1], k_cmp.shape[2]
  g, nsel = n // kh, -(-kv_len // ls)
  out = np.zeros(q.shape)
  chosen = np.empty((b, t, kh), object)
  for bi in range(b):
    for ti in range(t):
      p = q_offset + ti
      ok = np.array([i * d + l - 1 <= p for i in range(c)])
      if segments is not None:
        seg = np.asarray(segments[bi])
        ok &= np.array([i * d + l <= kv_len and np.all(seg[i * d:i * d + l] == seg[p])
                        for i in range(c)])
      p_cmp = np.zeros((n, c))
      for ni in range(n):
        s = k_cmp[bi, :, ni // g] @ q[bi, ti, ni] / np.sqrt(h)
        if ok.any():
          e = np.where(ok, np.exp(s - s[ok].max()), 0.0)
          p_cmp[ni] = e / e.sum()
        out[bi, ti, ni] = p_cmp[ni] @ v_cmp[bi, :, ni // g]
      own = p // ls
      for ki in range(kh):
        group = p_cmp[ki * g:(ki + 1) * g].sum(0)
        p_slc = np.zeros(nsel)
        for j in range(nsel):  # eq. 9, the compressed blocks overlapping block j
          for m in range(ls // d):
            for nn in range(l // d):
              i = (ls // d) * j + m - nn
              if 0 <= i < c:
                p_slc[j] += group[i]
        forced = [j for j in range(own + 1) if j < initial or j > own - local]
        rest = sorted((j for j in range(own + 1) if j not in forced), key=lambda j: -p_slc[j])
        chosen[bi, ti, ki] = frozenset((forced + rest)[:top_n])
  return out, chosen


def _sets(ids):
  ids = np.asarray(ids)
  out = np.empty(ids.shape[:-1], object)
  for index in np.ndindex(ids.shape[:-1]):
    out[index] = frozenset(int(x) for x in ids[index] if x >= 0)
  return out


CASES = {  # l, d, l', top_n, initial, local, heads, kv_heads, q_offset, segments
    "mha": (4, 2, 4, 3, 1, 1, 2, 2, 0, False),
    "gqa-overlap": (8, 4, 8, 3, 1, 2, 4, 2, 0, False),
    "mqa-offset": (4, 2, 8, 2, 0, 1, 4, 1, 7, False),
    "segments": (4, 2, 4, 3, 1, 2, 2, 1, 0, True),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_the_paper(case):
  l, d, ls, top, initial, local, n, kh, offset, with_segments = CASES[case]
  b, t = 2, 21
  s = t + offset
  q, k_cmp, v_cmp = random_qkv(3, b, t, nsa.num_compressed(s, l, d), n, kh, 8)
  segments = random_segments(4, b, s) if with_segments else None
  mask = Mask(causal=True, q_offset=offset, q_segment_ids=segments, kv_segment_ids=segments)
  out, ids = nsa.compressed_attention(q, k_cmp, v_cmp, kv_len=s, block_len=l, stride=d,
                                      select_block=ls, top_n=top, initial_blocks=initial,
                                      local_blocks=local, mask=mask, block_q=8)
  want_out, want_sets = paper_nsa_compressed(q, k_cmp, v_cmp, kv_len=s, l=l, d=d, ls=ls,
                                             top_n=top, initial=initial, local=local,
                                             q_offset=offset, segments=segments)
  assert ids.shape == (b, t, kh, min(top, -(-s // ls)))
  assert_close(out, want_out)
  assert (_sets(ids) == want_sets).all()


def test_selection_weights_are_the_papers_double_sum():
  l, d, ls, c, nsel = 8, 2, 8, 9, 3
  want = np.zeros((c, nsel))
  for j in range(nsel):
    for m in range(ls // d):
      for n in range(l // d):
        if 0 <= (ls // d) * j + m - n < c:
          want[(ls // d) * j + m - n, j] += 1
  np.testing.assert_array_equal(nsa.selection_weights(c, nsel, l, d, ls), want)


def test_chunked_gradient_equals_one_chunk():
  """Chunks are recomputed in the backward pass (checkpoint): same gradients as one chunk."""
  q, k_cmp, v_cmp = random_qkv(5, 1, 20, nsa.num_compressed(20, 4, 2), 4, 2, 8)
  loss = lambda block_q: lambda *a: jnp.sum(jnp.sin(nsa.compressed_attention(
      *a, kv_len=20, block_len=4, stride=2, select_block=4, top_n=2, block_q=block_q)[0]))
  got = jax.grad(loss(8), argnums=(0, 1, 2))(q, k_cmp, v_cmp)
  want = jax.grad(loss(20), argnums=(0, 1, 2))(q, k_cmp, v_cmp)
  for a, w in zip(got, want):
    assert_close(a, w, grad=True)
  assert float(jnp.abs(got[0]).sum()) > 0


def test_refusals():
  q, k_cmp, v_cmp = random_qkv(6, 1, 8, 3, 2, 1, 8)
  call = lambda **kw: nsa.compressed_attention(
      q, k_cmp, v_cmp, **dict(dict(kv_len=8, block_len=4, stride=2, select_block=4, top_n=2),
                              **kw))
  with pytest.raises(ValueError, match=r"l % d == 0 and l' % d == 0"):
    call(block_len=3)
  with pytest.raises(ValueError, match="causal mask without a window"):
    call(mask=Mask(causal=True, window=(2, 0)))
  with pytest.raises(ValueError, match="k_cmp holds 3 compressed blocks"):
    call(kv_len=12)
