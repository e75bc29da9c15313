"""SparseAttention vs flax.nnx.MultiHeadAttention, and decode caches."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
import numpy as np

from jsparse import attention
from jsparse.methods import base
from pallas_kernels import layout as layout_lib
from tests import tolerances
from tests.jsparse import inputs

ATOL = tolerances.atol(jnp.float32)


def _rope_pair(kv_heads, rope):
  """(nnx MHA, SparseAttention) with the same parameters, RoPE optional."""
  kw = dict(num_heads=4, in_features=16, qkv_features=32,
            num_kv_heads=kv_heads, rngs=nnx.Rngs(0))
  extra = {}
  if rope:
    extra["attention_fn"] = functools.partial(
        nnx.dot_product_attention_with_rope, rope=nnx.RoPE(theta=100.0))
  mha = nnx.MultiHeadAttention(**kw, decode=False, **extra)
  sparse = attention.SparseAttention(**kw,
                                     rope_theta=100.0 if rope else None)
  nnx.update(sparse, nnx.state(mha, nnx.Param))
  return mha, sparse


def _values_and_param_grads(module, x, cot, transform):
  """transform(value_and_grad) of <module(x, is_causal=True), cot>."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def loss(params, x):
    y = nnx.merge(graphdef, params, rest)(x, is_causal=True)
    return jnp.vdot(y, cot), y

  (_, y), grads = transform(jax.value_and_grad(loss, has_aux=True))(params,
                                                                    x)
  return y, grads


class SparseAttentionTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_values_and_grads_match_nnx(self):
    mha, sparse = _rope_pair(kv_heads=2, rope=True)
    x = inputs.normal(6, (2, 20, 16))
    cot = inputs.normal(7, x.shape)
    got, grads = _values_and_param_grads(sparse, x, cot, self.variant)
    want, want_grads = _values_and_param_grads(mha, x, cot, jax.jit)
    chex.assert_shape(got, x.shape)
    chex.assert_type(got, x.dtype)
    chex.assert_tree_all_finite((got, grads))
    chex.assert_trees_all_close(got, want, atol=ATOL)
    chex.assert_trees_all_close(grads, want_grads,
                                atol=tolerances.grad_atol(x.dtype))

  @parameterized.parameters((None, False), (2, True))
  def test_matches_nnx_and_decode(self, kv_heads, rope):
    mha, sparse = _rope_pair(kv_heads, rope)
    x = inputs.normal(1, (2, 20, 16))
    want = mha(x, is_causal=True)
    got = nnx.jit(lambda m, x: m(x, is_causal=True))(sparse, x)
    chex.assert_trees_all_close(got, want, atol=ATOL)
    sparse.init_cache((2, 20, 16))
    step = nnx.jit(lambda m, x: m(x, decode=True))
    outs = jnp.concatenate([step(sparse, x[:, i:i + 1]) for i in range(20)],
                           1)
    chex.assert_trees_all_close(outs, want, atol=ATOL)


class _NeedsLayer(base.SparseMethod):
  """Dense plan in blocks of 8; `plan` requires the `layer` context."""

  def __init__(self):
    self.config = None

  def plan(self, q, k, v, *, layer):
    del v, layer
    return base.SparsePlan(layout=layout_lib.BlockLayout.dense(
        q.shape[1], k.shape[1], block_q=8, block_kv=8))


def _pair(**kw):
  """(nnx MHA, SparseAttention) with the same parameters."""
  args = dict(num_heads=4, in_features=16, num_kv_heads=2, rngs=nnx.Rngs(0))
  args.update(kw)
  mha = nnx.MultiHeadAttention(**args, decode=False)
  sparse = attention.SparseAttention(**args)
  nnx.update(sparse, nnx.state(mha, nnx.Param))
  return mha, sparse


def _padding(lengths, t):
  valid = jnp.arange(t)[None] < jnp.asarray(lengths)[:, None]
  return valid, nnx.make_attention_mask(valid, valid)


class NnxKeywordTest(absltest.TestCase):

  def test_mask_and_is_causal_match_nnx(self):
    mha, sparse = _pair()
    x = inputs.normal(0, (2, 24, 16))
    valid, mask = _padding([24, 15], 24)
    run = nnx.jit(lambda m, x, mask: m(x, mask=mask, is_causal=True))
    chex.assert_trees_all_close(run(sparse, x, mask)[valid],
                                run(mha, x, mask)[valid], atol=ATOL)

  def test_mask_restricts_a_method_with_context(self):
    mha, _ = _pair()
    sparse = attention.SparseAttention(4, 16, num_kv_heads=2,
                                       method=_NeedsLayer(), rngs=nnx.Rngs(0))
    nnx.update(sparse, nnx.state(mha, nnx.Param))
    x = inputs.normal(1, (2, 24, 16))
    valid, mask = _padding([24, 11], 24)
    got = nnx.jit(lambda m, x: m(x, mask=mask, is_causal=True,
                                 method_context={"layer": 3}))(sparse, x)
    want = mha(x, mask=mask, is_causal=True)
    chex.assert_trees_all_close(got[valid], want[valid], atol=ATOL)
    with self.assertRaisesRegex(TypeError, "layer"):
      sparse(x)

  def test_constructor_keywords_match_nnx(self):
    mesh = jax.make_mesh((1,), ("heads",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:1])
    kw = dict(
        qkv_features=32, use_bias=True, normalize_qk=True,
        dropout_rate=0.1, broadcast_dropout=False, deterministic=True,
        precision=jax.lax.Precision.HIGHEST, keep_rngs=False,
        out_kernel_init=nnx.initializers.normal(0.5),
        out_bias_init=nnx.initializers.ones_init(),
        kernel_metadata={"out_sharding": (None, "heads", None)},
        bias_metadata={"out_sharding": ("heads", None)},
        out_kernel_metadata={"out_sharding": ("heads", None, None)},
        out_bias_metadata={"out_sharding": (None,)},
        query_ln_scale_metadata={"out_sharding": (None,)},
        key_ln_scale_metadata={"out_sharding": (None,)})
    with jax.set_mesh(mesh):
      mha = nnx.MultiHeadAttention(4, 16, rngs=nnx.Rngs(0), decode=False,
                                   **kw)
      sparse = attention.SparseAttention(4, 16, rngs=nnx.Rngs(0), **kw)
    want = nnx.state(mha, nnx.Param)
    got = nnx.state(sparse, nnx.Param)
    self.assertEqual(jax.tree.structure(got), jax.tree.structure(want))
    for g, w in zip(jax.tree.leaves(got, is_leaf=_is_var),
                    jax.tree.leaves(want, is_leaf=_is_var)):
      chex.assert_trees_all_equal(g[...], w[...])
      self.assertEqual(g.get_metadata(), w.get_metadata())
    x = inputs.normal(2, (1, 8, 16))
    run = nnx.jit(lambda m, x: m(x))
    chex.assert_trees_all_close(run(sparse, x), run(mha, x), atol=ATOL)

  def test_unknown_and_unsupported_keywords_raise(self):
    _, sparse = _pair()
    x = jnp.zeros((1, 8, 16))
    for bad in (dict(causal=True), dict(positions=jnp.arange(8)),
                dict(layer=0)):
      with self.assertRaises(TypeError):
        sparse(x, **bad)
    with self.assertRaises(TypeError):
      attention.SparseAttention(4, 16, attention_fn=None, rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(NotImplementedError, "sow_weights"):
      sparse(x, sow_weights=True)
    _, dropout = _pair(dropout_rate=0.1)
    with self.assertRaisesRegex(NotImplementedError, "dropout"):
      dropout(x, deterministic=False)
    with self.assertRaisesRegex(ValueError, "deterministic"):
      dropout(x)
    with self.assertRaisesRegex(ValueError, "dropout_rate"):
      _pair(dropout_rate=1.0)

  def test_per_batch_positions_with_rope(self):
    sparse = attention.SparseAttention(4, 16, rope_theta=100.0,
                                       rngs=nnx.Rngs(0))
    x = inputs.normal(3, (2, 8, 16))
    pos = jnp.stack([jnp.arange(8), 3 * jnp.arange(8)])
    run = nnx.jit(lambda m, x, p: m(x, input_positions=p, is_causal=True))
    got = run(sparse, x, pos)
    for b in range(2):
      same = run(sparse, x, jnp.broadcast_to(pos[b], pos.shape))
      chex.assert_trees_all_close(got[b], same[b], atol=ATOL)
    self.assertGreater(np.abs(got[1] - run(sparse, x, pos[::-1])[1]).max(),
                       1e-3)
    with self.assertRaisesRegex(ValueError, "input_positions"):
      sparse(x, input_positions=jnp.arange(7))


class DecodeCacheTest(absltest.TestCase):

  def test_full_cache_raises_before_writing(self):
    _, sparse = _pair()
    x = inputs.normal(4, (2, 3, 16))
    sparse.init_cache(x.shape)
    step = nnx.jit(lambda m, x: m(x, decode=True))
    for i in range(3):
      step(sparse, x[:, i:i + 1])
    keys = np.asarray(sparse.cached_key[...])
    with self.assertRaisesRegex(Exception, "decode past the cache"):
      step(sparse, x[:, :1])
    with self.assertRaisesRegex(ValueError, "decode past the cache"):
      sparse(x[:, :1], decode=True)
    self.assertEqual(int(sparse.cache_index[...]), 3)
    chex.assert_trees_all_equal(sparse.cached_key[...], keys)

  def test_batch_mismatch_raises_before_writing(self):
    _, sparse = _pair()
    sparse.init_cache((2, 4, 16))
    with self.assertRaisesRegex(ValueError, "does not match the cache"):
      sparse(jnp.ones((3, 1, 16)), decode=True)
    self.assertEqual(int(sparse.cache_index[...]), 0)
    cached = sparse.cached_key[...]
    chex.assert_trees_all_equal(cached, jnp.zeros_like(cached))

  def test_decode_honours_a_key_mask(self):
    mha, sparse = _pair()
    x = inputs.normal(5, (2, 6, 16))
    mask = jnp.array([[1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 0, 1]], bool)
    mask = mask[:, None, None, :]
    step = nnx.jit(lambda m, x: m(x, mask=mask, decode=True))
    for m in (mha, sparse):
      m.init_cache(x.shape)
    for i in range(6):
      chex.assert_trees_all_close(step(sparse, x[:, i:i + 1]),
                                  step(mha, x[:, i:i + 1]), atol=ATOL)


def _is_var(x):
  return isinstance(x, nnx.Variable)


if __name__ == "__main__":
  absltest.main()
