"""jsparse.dot_product_attention vs jax.nn, jsparse.attention_fn vs nnx."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import jsparse
from jsparse.methods import moa
from jsparse.methods import radial
from tests import jaxpr_size
from tests import tolerances
from tests.jsparse import inputs

# The parity bar in f32.
ATOL = 1e-5
# GQA; multi-block layouts are covered by masking_test (small blocks).
B, T, S, N, K, H = 2, 40, 48, 4, 2, 8
Q_LENS = np.array([T, 23], np.int32)
KV_LENS = np.array([S, 29], np.int32)
WINDOW = (12, 4)


def _qkv(dtype=jnp.float32):
  return (inputs.normal(0, (B, T, N, H), dtype),
          inputs.normal(1, (B, S, K, H), dtype),
          inputs.normal(2, (B, S, K, H), dtype))


def _mask(kind: str) -> np.ndarray | None:
  rng = np.random.default_rng(1)
  shape = {"keys": (B, 1, 1, S), "queries": (B, 1, T, 1),
           "dense": (B, 1, T, S), "heads": (1, N, T, S)}.get(kind)
  return None if shape is None else rng.random(shape) < 0.75


def _bias() -> np.ndarray:
  return np.random.default_rng(2).normal(size=(1, N, 1, S)).astype(np.float32)


def _arguments(mask, causal, window, lengths, bias):
  args = dict(is_causal=causal, local_window_size=window)
  if mask is not None:
    args["mask"] = jnp.asarray(mask)
  if lengths:
    args["query_seq_lengths"] = jnp.asarray(Q_LENS)
    args["key_value_seq_lengths"] = jnp.asarray(KV_LENS)
  if bias:
    args["bias"] = jnp.asarray(_bias())
  return args


def _visible(args, t=T, s=S) -> np.ndarray:
  """bool [B, T, N]: rows that see at least one key (a NumPy oracle)."""
  i, j = np.arange(t)[:, None], np.arange(s)[None, :]
  vis = np.ones((B, N, t, s), bool)
  if "mask" in args:
    vis &= np.asarray(args["mask"])
  if args.get("is_causal"):
    vis &= j <= i
  window = args.get("local_window_size")
  if window is not None:
    left, right = (window, window) if isinstance(window, int) else window
    vis &= (j >= i - left) & (j <= i + right)
  if "query_seq_lengths" in args:
    vis &= (np.arange(t) < Q_LENS[:, None])[:, None, :, None]
    vis &= (np.arange(s) < KV_LENS[:, None])[:, None, None, :]
  return vis.any(-1).transpose(0, 2, 1)


class DotProductAttentionTest(parameterized.TestCase):

  @parameterized.product(mask=["none", "keys", "queries", "dense", "heads"],
                         causal=[False, True], window=[None, WINDOW],
                         lengths=[False, True], bias=[False, True])
  def test_matches_jax_nn(self, mask, causal, window, lengths, bias):
    q, k, v = _qkv()
    args = _arguments(_mask(mask), causal, window, lengths, bias)
    got = jsparse.dot_product_attention(q, k, v, **args)
    want = jax.nn.dot_product_attention(q, k, v, **args)
    seen = _visible(args)
    np.testing.assert_allclose(got[seen], want[seen], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(got[~seen], 0.0)

  @parameterized.parameters(
      dict(mask="keys", causal=True, window=None, lengths=True, bias=True),
      dict(mask="heads", causal=False, window=WINDOW, lengths=False,
           bias=False))
  def test_gradients_match_jax_nn(self, **case):
    q, k, v = _qkv()
    args = _arguments(_mask(case.pop("mask")), **case)
    bias = args.pop("bias", jnp.zeros((1, N, 1, S)))
    cot = inputs.normal(3, q.shape)
    cot = jnp.where(_visible(args)[..., None], cot, 0.0)

    def loss(fn):
      return lambda q, k, v, bias: jnp.sum(fn(q, k, v, bias, **args) * cot)

    grad = lambda fn: jax.jit(jax.grad(loss(fn), (0, 1, 2, 3)))  # noqa: E731
    got = grad(jsparse.dot_product_attention)(q, k, v, bias)
    want = grad(jax.nn.dot_product_attention)(q, k, v, bias)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, atol=tolerances.grad_atol(g.dtype))

  def test_bf16_matches_f32_oracle(self):
    q, k, v = _qkv(jnp.bfloat16)
    args = _arguments(_mask("keys"), True, None, True, False)
    got = jax.jit(lambda q, k, v: jsparse.dot_product_attention(
        q, k, v, **args))(q, k, v)
    self.assertEqual(got.dtype, jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.nn.dot_product_attention(*f32, **args)
    seen = _visible(args)
    np.testing.assert_allclose(got.astype(jnp.float32)[seen], want[seen],
                               atol=tolerances.atol(jnp.bfloat16))

  def test_traced_masks_under_jit(self):
    q, k, v = _qkv()
    for kind in ("keys", "dense"):
      args = _arguments(_mask(kind), True, None, True, False)
      mask = args.pop("mask")
      run = jax.jit(lambda q, k, v, m: jsparse.dot_product_attention(
          q, k, v, mask=m, **args))  # pylint: disable=cell-var-from-loop
      got = run(q, k, v, mask)
      want = jax.nn.dot_product_attention(q, k, v, mask=mask, **args)
      seen = _visible(dict(args, mask=mask))
      np.testing.assert_allclose(got[seen], want[seen], atol=ATOL, rtol=0)

  def test_unbatched_inputs_and_int_window(self):
    q, k, v = (x[0] for x in _qkv())
    args = dict(local_window_size=5, scale=0.3)
    got = jax.jit(lambda q, k, v: jsparse.dot_product_attention(
        q, k, v, **args))(q, k, v)
    want = jax.nn.dot_product_attention(q, k, v, **args)
    self.assertEqual(got.shape, q.shape)
    np.testing.assert_allclose(got, want, atol=ATOL)

  def test_rows_with_no_key_are_zero_where_jax_nn_averages(self):
    # The documented difference: jax.nn gives a fully masked row the mean
    # of all values; the block-sparse op gives zeros (and no NaN).
    q, k, v = _qkv()
    lengths = jnp.asarray([S, 0], jnp.int32)
    got = jsparse.dot_product_attention(q, k, v,
                                        key_value_seq_lengths=lengths)
    want = jax.nn.dot_product_attention(q, k, v,
                                        key_value_seq_lengths=lengths)
    np.testing.assert_array_equal(got[1], 0.0)
    mean = jnp.repeat(v[1].mean(0), N // K, axis=0)
    np.testing.assert_allclose(want[1], jnp.broadcast_to(mean, want[1].shape),
                               atol=ATOL)
    np.testing.assert_allclose(got[0], want[0], atol=ATOL)

  def test_no_t_by_s_array_for_band_and_lengths(self):
    t = s = 1024
    q = jnp.zeros((1, t, 1, 8))
    k = v = jnp.zeros((1, s, 1, 8))
    lengths = jnp.asarray([900], jnp.int32)
    keys = jnp.ones((1, 1, 1, s), bool)
    fn = lambda q, k, v, m, n: jsparse.dot_product_attention(  # noqa: E731
        q, k, v, mask=m, is_causal=True, local_window_size=(64, 0),
        query_seq_lengths=n, key_value_seq_lengths=n)
    size, shape, prim = jaxpr_size.largest_intermediate(fn, q, k, v, keys,
                                                        lengths)
    self.assertLess(size, t * s // 2, f"{prim} builds {shape}")

  @parameterized.named_parameters(
      ("bias_over_queries", dict(bias=jnp.zeros((1, 1, T, S))),
       "bias must be per key"),
      ("int_mask", dict(mask=jnp.ones((1, 1, T, S), jnp.int32)),
       "mask must be boolean"),
      ("mask_shape", dict(mask=jnp.ones((1, 1, T, S + 1), bool)),
       "mask must be broadcastable"),
      ("lengths_dtype", dict(key_value_seq_lengths=jnp.ones((B,))),
       "key_value_seq_lengths must be int32"),
      ("window", dict(local_window_size=(1, 2, 3)), "local_window_size"))
  def test_bad_arguments_raise(self, args, message):
    q, k, v = _qkv()
    with self.assertRaisesRegex(ValueError, message):
      jsparse.dot_product_attention(q, k, v, **args)


class _Encoder(nnx.Module):
  """A stock post-norm nnx encoder: attention_fn is the only knob."""

  def __init__(self, attention_fn, *, layers=2, dim=16, rngs):
    kw = dict(attention_fn=attention_fn) if attention_fn else {}
    self.attns = nnx.List([
        nnx.MultiHeadAttention(4, dim, num_kv_heads=2, decode=False,
                               rngs=rngs, **kw) for _ in range(layers)])
    self.norms = nnx.List([nnx.LayerNorm(dim, rngs=rngs)
                           for _ in range(layers)])
    self.mlps = nnx.List([nnx.Linear(dim, dim, rngs=rngs)
                          for _ in range(layers)])

  def __call__(self, x, mask=None, is_causal=False):
    for attn, norm, mlp in zip(self.attns, self.norms, self.mlps):
      x = norm(x + attn(x, mask=mask, is_causal=is_causal))
      x = x + jax.nn.gelu(mlp(x))
    return x


def _pair(attention_fn, **kw):
  """(nnx default, same parameters with `attention_fn`)."""
  ref = _Encoder(None, rngs=nnx.Rngs(0), **kw)
  model = _Encoder(attention_fn, rngs=nnx.Rngs(0), **kw)
  nnx.update(model, nnx.state(ref, nnx.Param))
  return ref, model


class AttentionFnTest(absltest.TestCase):

  def test_encoder_with_padding_masks_matches_nnx(self):
    # Blocks of 16 over T = 40: three query and kv blocks, the last ragged.
    ref, model = _pair(jsparse.attention_fn(block_q=16, block_kv=16))
    x = inputs.normal(0, (2, 40, 16))
    valid = jnp.arange(40)[None] < jnp.array([[40], [27]])
    mask = nnx.make_attention_mask(valid, valid)
    want = _run(ref, x, mask)
    np.testing.assert_allclose(_run(model, x, mask)[valid], want[valid],
                               atol=ATOL)

  def test_causal_decoder_with_decode_matches_nnx(self):
    ref, model = _pair(jsparse.attention_fn(block_q=16, block_kv=16))
    x = inputs.normal(1, (2, 20, 16))
    want = _run(ref, x, None, True)
    np.testing.assert_allclose(_run(model, x, None, True), want, atol=ATOL)
    for attn in (*ref.attns, *model.attns):
      attn.init_cache(x.shape)
      attn.decode = True
    for i in range(x.shape[1]):
      got = _run(model, x[:, i:i + 1])
      np.testing.assert_allclose(got, _run(ref, x[:, i:i + 1]), atol=ATOL)
      np.testing.assert_allclose(got[:, 0], want[:, i], atol=ATOL)

  def test_runs_with_a_sparse_method(self):
    config = radial.RadialConfig(num_frames=4, tokens_per_frame=16,
                                 block_size=16)
    _, model = _pair(jsparse.attention_fn(radial.RadialMethod(config)))
    x = inputs.normal(2, (2, 64, 16))
    valid = jnp.arange(64)[None] < jnp.array([[64], [40]])
    mask = valid[:, None, None, :]
    out = _run(model, x, mask)
    noisy = _run(model, jnp.where(valid[..., None], x, 9.0), mask)
    self.assertTrue(np.isfinite(out).all())
    # Padded keys are invisible to the valid rows.
    np.testing.assert_allclose(noisy[valid], out[valid], atol=ATOL)

  def test_causal_method_prefill(self):
    config = moa.MoAConfig(alphas=(0.0,) * 4, betas=(0.5,) * 4,
                           block_size=16, sink_tokens=16, min_span=32)
    ref, model = _pair(jsparse.attention_fn(moa.MoAMethod(config)))
    x = inputs.normal(3, (1, 64, 16))
    out = _run(model, x, None, True)
    later = _run(model, x.at[:, 40:].add(1.0), None, True)
    np.testing.assert_allclose(later[:, :40], out[:, :40], atol=ATOL)
    # The first 32 tokens lie inside every head's span: dense causal there.
    np.testing.assert_allclose(out[:, :32], _run(ref, x, None, True)[:, :32],
                               atol=ATOL)

  def test_unsupported_arguments_raise(self):
    fn = jsparse.attention_fn()
    q = k = v = jnp.zeros((1, 8, 2, 4))
    with self.assertRaisesRegex(NotImplementedError, "sow_weights"):
      fn(q, k, v, module=nnx.Linear(1, 1, rngs=nnx.Rngs(0)))
    with self.assertRaisesRegex(NotImplementedError, "dropout"):
      fn(q, k, v, dropout_rate=0.1, deterministic=False)
    with self.assertRaisesRegex(ValueError, "bias must be per key"):
      fn(q, k, v, bias=jnp.zeros((1, 2, 8, 8)))
    with self.assertRaisesRegex(ValueError, "nnx variables"):
      jsparse.attention_fn(nnx.Linear(1, 1, rngs=nnx.Rngs(0)))

  def test_extra_batch_dims_and_float_masks(self):
    q, k, v = (x.reshape(1, *x.shape) for x in _qkv())
    mask = jnp.asarray(_mask("dense"))
    got = jsparse.attention_fn()(q, k, v, mask=mask.astype(jnp.float32),
                                 dropout_rate=0.1, deterministic=True)
    want = nnx.dot_product_attention(q, k, v, mask=mask)
    self.assertEqual(got.shape, q.shape)
    seen = _visible(dict(mask=mask))[None]
    np.testing.assert_allclose(got[seen], want[seen], atol=ATOL)


@nnx.jit(static_argnums=3)
def _run(model, x, mask=None, is_causal=False):
  return model(x, mask, is_causal)


if __name__ == "__main__":
  absltest.main()
