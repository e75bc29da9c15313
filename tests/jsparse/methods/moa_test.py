"""MoA: elastic layouts, decode, influence formula, MILP plan search."""

import os
import tempfile

from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jsparse import attention
from jsparse.methods import moa
from tests.jsparse.methods import method_test_base as mtb

CONFIG = moa.MoAConfig(alphas=(16.0, -32.0), betas=(0.0, 0.5), block_size=16,
                       sink_tokens=16, min_span=32)


def _token_mask(cfg, n, rows):
  """Token-exact sinks + window of query positions `rows` (decode rule)."""
  sink, window = moa.head_spans(cfg, n)
  i = np.asarray(rows)[None, :, None]
  j = np.arange(n)[None, None, :]
  return (j <= i) & ((j < sink[:, None, None]) | (j > i - window[:, None,
                                                                 None]))


class MoATest(mtb.MethodTestBase):

  def make_method(self):
    return moa.MoAMethod(CONFIG)

  def dense_method(self):
    return moa.MoAMethod(moa.MoAConfig(alphas=(0.0, 0.0), betas=(1.0, 1.0),
                                       block_size=16, sink_tokens=16,
                                       min_span=32))

  def dense_mask(self, method, q, k, kwargs):
    n = q.shape[1]
    return jnp.tril(jnp.ones((n, n), bool))[None, None]

  def inputs(self, method):
    return (*mtb.random_qkv(0, 1, 100, 100, 2, 2, 8), {})

  def logical_mask(self, method, q, k, kwargs):
    n, b = q.shape[1], method.config.block_size
    sink, window = moa.head_spans(method.config, n)
    i = np.arange(n)[:, None] // b
    j = np.arange(n)[None, :] // b
    blocks = (j <= i) & ((j < sink[:, None, None] // b)
                         | (j > i - window[:, None, None] // b))
    return jnp.asarray(blocks & (np.arange(n)[None, :] <=
                                 np.arange(n)[:, None]))[None]

  def test_spans(self):
    sink, window = moa.head_spans(CONFIG, 100)
    np.testing.assert_array_equal(sink, [16, 16])
    # Head 0: 16 -> min 32; head 1: -32 + 50 = 18 -> 32 (block multiple).
    np.testing.assert_array_equal(sink + window, [32, 32])
    sink, window = moa.head_spans(CONFIG, 400)
    np.testing.assert_array_equal(sink + window, [32, 176])

  def test_decode_matches_token_exact_reference(self):
    attn = attention.SparseAttention(2, 16, method=self.make_method(),
                                     rngs=nnx.Rngs(0))
    n = 40
    x = jax.random.normal(jax.random.key(0), (1, n, 16))
    attn.init_cache((1, n, 16))
    step = nnx.jit(lambda m, x: m(x, decode=True))
    outs = jnp.concatenate([step(attn, x[:, i:i + 1]) for i in range(n)], 1)
    q, k, v = attn.query(x), attn.key(x), attn.value(x)
    mask = jnp.asarray(_token_mask(CONFIG, n, np.arange(n)))[None]
    ref = attn.out(mtb.masked_attention(q, k, v, mask))
    np.testing.assert_allclose(outs, ref, atol=1e-5)

  def test_influence_matches_brute_force(self):
    # With a loss linear in A, the first-order influence is exact.
    n = 6
    key = jax.random.split(jax.random.key(0), 3)
    logits = jax.random.normal(key[0], (n, n))
    probs = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((n, n), bool)),
                                     logits, -jnp.inf), -1)
    weight = jax.random.normal(key[1], (n, n))
    loss = lambda a: jnp.sum(a * weight)
    est = moa.influence(probs, jax.grad(loss)(probs), eps=0.0)
    for i in range(1, n):
      for j in range(i + 1):
        if probs[i, j] > 0.99:
          continue
        row = probs[i].at[j].set(0.0)
        dropped = probs.at[i].set(row / row.sum())
        np.testing.assert_allclose(est[i, j], loss(dropped) - loss(probs),
                                   atol=1e-5)

  def test_probe_profile_matches_explicit_attention_gradient(self):
    # dL/dA from an explicit map A (through A V) equals dO V^T of the probe.
    model = moa.TinyLM(dim=32, heads=2, layers=2, rngs=nnx.Rngs(0))
    n, block = 32, 8
    tokens = jax.random.randint(jax.random.key(1), (2, n), 0, 256)
    mask = jnp.broadcast_to(jnp.arange(n) >= n // 2, (2, n))
    tiles = moa.profile_model(model, [(tokens, mask)], block)
    self.assertEqual(tiles.shape, (2, 2, n // block, n // block))
    attn, mlp = model.attns[1], model.mlps[1]
    x = model.embed(tokens)
    x = x + model.attns[0](model.norms[0](x), is_causal=True)
    x = x + model.mlps[0](model.norms[1](x))
    h = model.norms[2](x)
    _, (q, k, v) = attn.probed(h, jnp.zeros((2, n, 2, 16)))
    s = jnp.einsum("bthd,bshd->bhts", q, k) / 4.0
    probs = jax.nn.softmax(
        jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -jnp.inf), -1)

    def loss(a):
      y = x + attn.out(jnp.einsum("bhts,bshd->bthd", a, v))
      y = y + mlp(model.norms[3](y))
      return moa.response_loss(model.head(y), tokens, mask)

    want = moa.tile_sums(
        jnp.abs(moa.influence(probs, jax.grad(loss)(probs))), block).mean(0)
    np.testing.assert_allclose(tiles[1], want, rtol=1e-4, atol=1e-7)
    self.assertTrue(np.all(np.triu(tiles[1], 1) == 0))

  def test_response_samples_are_suffixes_with_the_response_masked_in(self):
    seq = np.arange(100)
    out = moa.response_samples([seq], response_len=10, lengths=(32, 64))
    tokens, mask = out[32][0]
    np.testing.assert_array_equal(tokens[0], seq[-32:])
    np.testing.assert_array_equal(mask[0], np.arange(32) >= 22)
    with self.assertRaisesRegex(ValueError, "response_len"):
      moa.response_samples([seq], response_len=40, lengths=(32,))

  def test_search_density_is_the_inference_layout_density(self):
    space = moa.SearchSpace(block=16, profile_lengths=(128, 256),
                            extend_length=512)
    cands = space.candidates()
    _, density = moa.rule_cost(cands, None, 256, space)
    n, b = 256, 16
    causal = np.tril(np.ones((n, n), bool))
    for (alpha, beta), d in list(zip(cands, density))[::7]:
      layout = moa.host_layout(space.config([alpha], [beta]), n)
      blocks = np.asarray(layout.to_block_mask())[0, 0] != 0
      entries = np.repeat(np.repeat(blocks, b, 0), b, 1) & causal
      self.assertAlmostEqual(d, entries.sum() / causal.sum())

  def test_milp_meets_budget_and_beats_uniform(self):
    rng = np.random.default_rng(0)
    space = moa.SearchSpace(block=16, profile_lengths=(128, 256),
                            extend_length=512, alpha_step=32, density=0.5)
    profiles = {}
    for n in space.profile_lengths:
      nb = n // 16
      dist = np.arange(nb)[:, None] - np.arange(nb)[None, :]
      local = np.exp(-np.maximum(dist, 0) / 2.0)
      far = np.zeros((nb, nb))
      far[:, nb // 3] = 1.0  # a "retrieval" column far from the diagonal
      tiles = np.stack([np.stack([local, far + 0.1 * local,
                                  local * rng.random((nb, nb)), far])] * 2)
      profiles[n] = np.tril(tiles)
    plan = moa.solve_plan(profiles, space)
    for density in plan["density"].values():
      self.assertLessEqual(density, space.density + 1e-9)
    uniform, _ = moa.uniform_plan_loss(profiles, space)
    self.assertLess(plan["loss"], uniform)
    betas = np.asarray(plan["betas"])
    self.assertTrue((betas > 0).any())
    for layer_a, layer_b in zip(plan["alphas"], plan["betas"]):
      self.assertLessEqual(len(set(zip(layer_a, layer_b))), 2)
    plans = moa.pareto_plans(profiles, space)
    self.assertGreaterEqual(len(plans), 1)
    keys = {str((p["alphas"], p["betas"])) for p in plans}
    self.assertLen(keys, len(plans))
    for p in plans:
      self.assertLessEqual(max(p["density"][str(n)]
                               for n in space.budget_lengths()),
                           space.density + 1e-9)
    best, losses = moa.best_plan(plans, lambda p: p["loss_per_length"]["256"])
    self.assertEqual(best["loss_per_length"]["256"], min(losses))
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "plan.json")
      moa.save_plan(plan, path)
      configs = moa.load_configs(path)
    self.assertLen(configs, 2)
    self.assertEqual(configs[0].alphas, tuple(plan["alphas"][0]))


if __name__ == "__main__":
  absltest.main()
