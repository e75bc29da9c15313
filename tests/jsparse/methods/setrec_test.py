"""SETRec: set-identifier mask, padding, and order invariance."""

from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jsparse import attention
from jsparse.methods import setrec
from tests.jsparse.methods import method_test_base as mtb

CONFIG = setrec.SETRecConfig(num_instruction=3, num_items=5,
                             tokens_per_item=3, num_response=2, block_q=8,
                             block_kv=8)
ITEM_VALID = jnp.array([[False, False, True, True, True], [True] * 5])


def _brute_mask(cfg, item_valid):
  """The four rules of the paper's code, one (b, i, j) at a time."""
  t = cfg.seq_len
  out = np.zeros((len(item_valid), t, t), bool)
  for b, valid in enumerate(np.asarray(item_valid)):
    for i in range(t):
      for j in range(t):
        hist = lambda x: cfg.history_start <= x < cfg.history_end
        item = lambda x: (x - cfg.history_start) // cfg.tokens_per_item
        if hist(j) and not valid[item(j)]:
          continue
        same = hist(i) and hist(j) and item(i) == item(j)
        out[b, i, j] = j == i or (j < i and not same and
                                  not (i >= t - cfg.tokens_per_item and
                                       j >= t - cfg.tokens_per_item))
  return out


class SETRecTest(mtb.MethodTestBase):
  TRAINS = True

  def make_method(self):
    return setrec.SETRecMethod(CONFIG)

  def dense_method(self):
    return setrec.SETRecMethod(setrec.SETRecConfig(
        num_instruction=3, num_items=5, tokens_per_item=1, num_response=2,
        block_q=8, block_kv=8))

  def dense_mask(self, method, q, k, kwargs):
    t = method.config.seq_len
    return jnp.tril(jnp.ones((t, t), bool))[None, None]

  def inputs(self, method):
    t = method.config.seq_len
    kwargs = {}
    if method.config.tokens_per_item > 1:
      kwargs = {"item_valid": ITEM_VALID}
    return (*mtb.random_qkv(0, 2, t, t, 2, 1, 8), kwargs)

  def logical_mask(self, method, q, k, kwargs):
    return jnp.asarray(_brute_mask(method.config,
                                   kwargs["item_valid"]))[:, None]

  def test_group_rule_equals_brute_force(self):
    np.testing.assert_array_equal(
        setrec.element_mask(CONFIG),
        _brute_mask(CONFIG, np.ones((1, CONFIG.num_items), bool))[0])
    pos = setrec.position_ids(CONFIG)
    self.assertEqual(len(set(pos[3:6])), 1)
    self.assertEqual(pos[-1], CONFIG.seq_len - 1)


class _TinyDecoder(nnx.Module):

  def __init__(self, method, *, rngs):
    self.layers = nnx.List([
        attention.SparseAttention(2, 16, method=method, rope_theta=100.0,
                                  rngs=rngs) for _ in range(2)])

  def __call__(self, x, positions, **kw):
    for layer in self.layers:
      x = x + layer(x, input_positions=positions, **kw)
    return x


class SETRecInvarianceTest(absltest.TestCase):

  def _outputs(self, method, x, perm, causal=False):
    model = _TinyDecoder(method, rngs=nnx.Rngs(0))
    pos = jnp.asarray(setrec.position_ids(CONFIG), jnp.float32)
    run = jax.jit(lambda x: model(x, pos, is_causal=causal))
    return run(x), run(x[:, perm])

  def test_permuting_an_item_leaves_queries_unchanged(self):
    x = jax.random.normal(jax.random.key(0), (1, CONFIG.seq_len, 16))
    perm = np.arange(CONFIG.seq_len)
    start = CONFIG.history_start + CONFIG.tokens_per_item  # item 1
    perm[start:start + 3] = perm[start:start + 3][::-1]
    nq = CONFIG.tokens_per_item
    a, b = self._outputs(setrec.SETRecMethod(CONFIG), x, perm)
    np.testing.assert_allclose(a[:, -nq:], b[:, -nq:], atol=1e-5)
    # A plain causal mask makes the item an ordered sequence.
    a, b = self._outputs(None, x, perm, causal=True)
    self.assertGreater(np.abs(a[:, -nq:] - b[:, -nq:]).max(), 1e-3)

  def test_queries_do_not_see_each_other(self):
    method = setrec.SETRecMethod(CONFIG)
    model = _TinyDecoder(method, rngs=nnx.Rngs(0))
    pos = jnp.asarray(setrec.position_ids(CONFIG), jnp.float32)
    x = jax.random.normal(jax.random.key(0), (1, CONFIG.seq_len, 16))
    x2 = x.at[:, -1].add(1.0)
    run = jax.jit(lambda x: model(x, pos))
    np.testing.assert_allclose(run(x)[:, -3:-1], run(x2)[:, -3:-1],
                               atol=1e-6)

  def test_head_loss_and_score(self):
    head = setrec.SETRecHead(CONFIG, 16, rngs=nnx.Rngs(0))
    ctx = jnp.zeros((2, CONFIG.seq_len - 3, 16))
    hidden = head.append_queries(ctx)
    self.assertEqual(hidden.shape, (2, CONFIG.seq_len, 16))
    tables = jax.random.normal(jax.random.key(1), (3, 7, 16))
    logits = head.logits(hidden, tables)
    self.assertEqual(logits.shape, (2, 3, 7))
    self.assertTrue(np.isfinite(head.loss(logits, jnp.array([1, 2]))))
    self.assertEqual(head.score(logits, 0.3).shape, (2, 7))


if __name__ == "__main__":
  absltest.main()
