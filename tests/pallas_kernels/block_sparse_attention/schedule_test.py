"""Masked-first block lists of the two-loop kernels (`schedule`)."""

from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp
import numpy as np

from pallas_kernels import BlockLayout
from pallas_kernels.block_sparse_attention import schedule
from pallas_kernels.block_sparse_attention import tile_math


def _spec(n, padded, *, band=None, causal=False, segments=False):
  return tile_math.MaskSpec(q_len=n, kv_len=n, kv_len_padded=padded,
                            band=band, has_segments=segments,
                            has_tiles=False, sm_scale=1.0, softcap=None,
                            causal=causal)


def _walked(layout, spec, offset=0, *, transposed=False):
  """(ids in walk order, masked count, total count) per row, as NumPy."""
  if transposed:
    lists = layout.transpose()
    idx, cnt, kind = lists.q_idx, lists.q_cnt, lists.q_kind
  else:
    idx, cnt, kind = layout.kv_idx, layout.kv_cnt, layout.kv_kind
  order, counts = schedule.masked_first(
      idx, cnt, kind, spec, jnp.int32(offset), rows_are_q=not transposed,
      block_q=layout.block_q, block_kv=layout.block_kv,
      num_kv_blocks=layout.num_kv_blocks)
  (ids,) = schedule.reorder(order, idx)
  return np.asarray(ids), np.asarray(counts[..., 0]), np.asarray(
      counts[..., 1])


class MaskedFirstTest(parameterized.TestCase):

  @parameterized.parameters((0, 0), (-32, 1))
  def test_causal_on_dense_lists(self, offset, shift):
    # Dense lists with causal: q block i keeps kv blocks [0, i - shift], the
    # last of them cut by the diagonal (masked, first); kv block j is kept
    # by q blocks [j + shift, 4), the first of them cut.
    layout = BlockLayout.dense(128, 128, block_q=32, block_kv=32)
    spec = _spec(128, 128, causal=True)
    ids, masked, total = _walked(layout, spec, offset)
    rows = np.arange(4)
    keep = np.maximum(rows + 1 - shift, 0)
    np.testing.assert_array_equal(total[0, 0], keep)
    np.testing.assert_array_equal(masked[0, 0], np.minimum(keep, 1))
    for i in range(shift, 4):
      np.testing.assert_array_equal(
          ids[0, 0, i, :keep[i]], [i - shift, *range(i - shift)])
    ids, masked, total = _walked(layout, spec, offset, transposed=True)
    keep = np.maximum(4 - rows - shift, 0)
    np.testing.assert_array_equal(total[0, 0], keep)
    np.testing.assert_array_equal(masked[0, 0], np.minimum(keep, 1))
    for j in range(4 - shift):
      np.testing.assert_array_equal(ids[0, 0, j, :keep[j]],
                                    range(j + shift, 4))

  def test_causal_layout_masks_only_its_partial_blocks(self):
    # BlockLayout.causal with causal=True: every listed block is walked and
    # only its PARTIAL (diagonal) blocks and the ragged last kv block take
    # the masked loop, listed first.
    layout = BlockLayout.causal(200, block_q=32, block_kv=32)
    spec = _spec(200, 224, band=layout.band, causal=True)
    ids, masked, total = _walked(layout, spec)
    np.testing.assert_array_equal(total, layout.kv_cnt)
    idx = np.asarray(layout.kv_idx)
    live = np.arange(idx.shape[-1]) < np.asarray(layout.kv_cnt)[..., None]
    needs = live & ((np.asarray(layout.kv_kind) == 1) | (idx == 6))
    np.testing.assert_array_equal(masked, needs.sum(-1))
    for row in range(idx.shape[2]):
      n = masked[0, 0, row]
      np.testing.assert_array_equal(np.sort(ids[0, 0, row, :n]),
                                    idx[0, 0, row][needs[0, 0, row]])

  def test_without_predicates_nothing_is_masked(self):
    layout = BlockLayout.dense(64, 64, block_q=32, block_kv=32)
    _, masked, total = _walked(layout, _spec(64, 64))
    np.testing.assert_array_equal(masked, 0)
    np.testing.assert_array_equal(total, 2)
    self.assertEqual(schedule.loops(_spec(64, 64)), (False, True))

  def test_segments_mask_every_block(self):
    layout = BlockLayout.dense(64, 64, block_q=32, block_kv=32)
    spec = _spec(64, 64, segments=True)
    _, masked, total = _walked(layout, spec)
    np.testing.assert_array_equal(masked, total)
    self.assertEqual(schedule.loops(spec), (True, False))


if __name__ == "__main__":
  absltest.main()
