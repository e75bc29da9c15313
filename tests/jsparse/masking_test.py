"""jax.nn-style masks as plans: the forms chosen, and values over blocks."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from jsparse import masking
from jsparse.methods import base
from pallas_kernels import layout as layout_lib
from tests.jsparse import inputs

ATOL = 1e-5
# Blocks of 16: three query and kv blocks, the last ones ragged.
B, T, S, N, K, H, BLOCK = 2, 40, 48, 4, 2, 8, 16
LENS = np.array([S, 29], np.int32)


def _qkv():
  return (inputs.normal(0, (B, T, N, H)), inputs.normal(1, (B, S, K, H)),
          inputs.normal(2, (B, S, K, H)))


def _valid(lengths, n):
  return np.arange(n)[None, :] < np.asarray(lengths)[:, None]


def _padding_mask(causal: bool) -> np.ndarray:
  """[B, 1, T, S] of nnx.make_attention_mask(valid_q, valid_kv) (& causal)."""
  mask = _valid([T, 23], T)[:, None, :, None] & _valid(LENS, S)[:, None,
                                                                None, :]
  if causal:
    mask &= np.tril(np.ones((T, S), bool))[None, None]
  return mask


def _pattern(shape) -> np.ndarray:
  return np.random.default_rng(1).random(shape) < 0.6


def _vis(**kw):
  return masking.visibility(batch=B, heads=N, q_len=T, kv_len=S, **kw)


def _check(got, want, visible):
  """Values on rows that see a key, zeros on the others."""
  seen = np.asarray(visible).any(-1).transpose(0, 2, 1)  # [B, T, N]
  np.testing.assert_allclose(got[seen], want[seen], atol=ATOL, rtol=0)
  np.testing.assert_array_equal(got[~seen], 0.0)


class VisibilityFormTest(absltest.TestCase):

  def test_padding_masks_become_segment_ids(self):
    for mask, causal in ((_padding_mask(False), False),
                         (_padding_mask(True), True)):
      vis = _vis(mask=jnp.asarray(mask))
      self.assertIsNone(vis.element)
      self.assertEqual(vis.band, (None, 0) if causal else None)
      plan = masking.dense_plan(vis, block_q=BLOCK, block_kv=BLOCK)
      self.assertIsNone(plan.layout.tiles)
      self.assertEqual(plan.q_segment_ids.shape, (B, T))

  def test_unit_dims_need_no_host_value(self):
    keys = jnp.ones((B, 1, 1, S), bool)
    queries = jnp.ones((B, 1, T, 1), bool)
    forms = []

    def record(keys, queries):
      for mask in (keys, queries):
        vis = _vis(mask=mask)
        forms.append((vis.element is None, vis.kv_valid is not None,
                      vis.q_valid is not None))
      return keys

    jax.jit(record)(keys, queries)
    self.assertEqual(forms, [(True, True, False), (True, False, True)])

  def test_patterns_become_tiles(self):
    vis = _vis(mask=jnp.asarray(_pattern((B, 1, T, S))))
    self.assertIsInstance(vis.element, np.ndarray)
    layout = masking.dense_plan(vis, block_q=BLOCK,
                                block_kv=BLOCK).layout
    self.assertIsNotNone(layout.tiles)
    self.assertTrue(layout.is_host)

  def test_bad_masks_raise(self):
    with self.assertRaisesRegex(ValueError, "mask must be boolean"):
      _vis(mask=jnp.ones((1, 1, T, S)))
    with self.assertRaisesRegex(ValueError, "broadcastable"):
      _vis(mask=jnp.ones((B, 2, T, S), bool))
    with self.assertRaisesRegex(ValueError, "at most 4 dims"):
      _vis(mask=jnp.ones((1, B, 1, T, S), bool))

  def test_block_size(self):
    self.assertEqual([masking.block_size(n) for n in (1, 16, 20, 128, 999)],
                     [16, 16, 32, 128, 128])

  def test_key_bias(self):
    bias = jnp.arange(S, dtype=jnp.float32).reshape(1, 1, 1, S)
    got = masking.key_bias(bias, batch=B, heads=N, q_len=T, kv_len=S)
    self.assertEqual(got.shape, (1, 1, S))
    with self.assertRaisesRegex(ValueError, "bias must be per key"):
      masking.key_bias(jnp.zeros((T, S)), batch=B, heads=N, q_len=T,
                       kv_len=S)


class DensePlanTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # Full blocks below the diagonal still honour the lengths.
      ("causal_lengths", dict(is_causal=True, q_lengths=[T, 23],
                              kv_lengths=LENS)),
      ("factored_padding", dict(mask=_padding_mask(True))),
      ("head_pattern_window", dict(mask=_pattern((1, N, T, S)),
                                   window=(20, 5), kv_lengths=LENS)))
  def test_matches_jax_nn(self, args):
    q, k, v = _qkv()
    args = {name: jnp.asarray(x) if name.endswith(("mask", "lengths")) else x
            for name, x in args.items()}
    got = masking.dense_plan(_vis(**args), block_q=BLOCK,
                             block_kv=BLOCK).attend(q, k, v)
    want = jax.nn.dot_product_attention(
        q, k, v, mask=args.get("mask"), is_causal=args.get("is_causal", False),
        local_window_size=args.get("window"),
        query_seq_lengths=args.get("q_lengths"),
        key_value_seq_lengths=args.get("kv_lengths"))
    _check(got, want, _oracle(**args))

  def test_traced_pattern_under_jit(self):
    q, k, v = _qkv()
    mask = jnp.asarray(_pattern((B, 1, T, S)))

    @jax.jit
    def run(q, k, v, mask):
      vis = _vis(mask=mask, is_causal=True)
      return masking.dense_plan(vis, block_q=BLOCK,
                                block_kv=BLOCK).attend(q, k, v)

    want = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
    _check(run(q, k, v, mask), want, _oracle(mask=mask, is_causal=True))


class RestrictTest(absltest.TestCase):

  def test_padding_and_causal_on_a_segmented_method_plan(self):
    # A "method" plan of full blocks with two packed segments of its own.
    seg = jnp.asarray(np.repeat([0, 1], [24, 24])[None].repeat(B, 0))
    plan = base.SparsePlan(
        layout=layout_lib.BlockLayout.dense(T, S, block_q=BLOCK,
                                            block_kv=BLOCK),
        q_segment_ids=seg[:, :T], kv_segment_ids=seg)
    vis = _vis(is_causal=True, kv_lengths=jnp.asarray(LENS))
    q, k, v = _qkv()
    got = masking.restrict(plan, vis).attend(q, k, v)
    same = (seg[:, :T, None] == seg[:, None, :])[:, None]
    want = jax.nn.dot_product_attention(
        q, k, v, mask=same, is_causal=True,
        key_value_seq_lengths=jnp.asarray(LENS))
    _check(got, want, _oracle(mask=same, is_causal=True, kv_lengths=LENS))

  def test_unsupported_restrictions_raise(self):
    plan = base.SparsePlan(layout=layout_lib.BlockLayout.dense(
        T, S, block_q=BLOCK, block_kv=BLOCK))
    with self.assertRaisesRegex(ValueError, "T x S pattern"):
      masking.restrict(plan, _vis(mask=jnp.asarray(_pattern((B, 1, T, S)))))
    with self.assertRaisesRegex(ValueError, "only a causal band"):
      masking.restrict(plan, _vis(window=(3, 3)))
    pooled = plan.replace(extra_k=jnp.zeros((B, 16, K, H)),
                          extra_v=jnp.zeros((B, 16, K, H)))
    with self.assertRaisesRegex(ValueError, "pooled keys"):
      masking.restrict(pooled, _vis(is_causal=True))
    self.assertIs(masking.restrict(pooled, _vis()), pooled)


def _oracle(mask=None, is_causal=False, window=None, q_lengths=None,
            kv_lengths=None) -> np.ndarray:
  """bool [B, N, T, S] visibility, in NumPy."""
  i, j = np.arange(T)[:, None], np.arange(S)[None, :]
  vis = np.ones((B, N, T, S), bool)
  if mask is not None:
    vis &= np.asarray(mask)
  if is_causal:
    vis &= j <= i
  if window is not None:
    vis &= (j >= i - window[0]) & (j <= i + window[1])
  if q_lengths is not None:
    vis &= _valid(q_lengths, T)[:, None, :, None]
  if kv_lengths is not None:
    vis &= _valid(kv_lengths, S)[:, None, None, :]
  return vis


if __name__ == "__main__":
  absltest.main()
