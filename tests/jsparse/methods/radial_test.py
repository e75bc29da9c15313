"""Radial: token rules vs an independent re-implementation, layout growth."""

from absl.testing import absltest
import jax.numpy as jnp
import numpy as np

from jsparse.methods import radial
from tests.jsparse.methods import method_test_base as mtb

CONFIG = radial.RadialConfig(num_frames=8, tokens_per_frame=32, block_size=16,
                             decay_factor=0.5, dense_timesteps=2,
                             dense_layers=1)


def _allowed(cfg, a, x, b, y):
  """Rules 1-4 for one (query, key) pair, written from the paper."""
  if cfg.sink_frame and b == 0:
    return True
  d = abs(a - b)
  if d <= 1:
    return True
  s_pow2 = 1 << cfg.tokens_per_frame.bit_length()
  base_len = s_pow2 / (1 << d.bit_length())
  if base_len < cfg.block_size and d % (cfg.block_size // base_len):
    return False
  return abs(x - y) <= max(base_len * cfg.decay_factor, cfg.block_size)


class RadialTest(mtb.MethodTestBase):
  TRAINS = True

  def make_method(self):
    return radial.RadialMethod(CONFIG)

  def dense_method(self):
    return radial.RadialMethod(radial.RadialConfig(
        num_frames=4, tokens_per_frame=64, block_size=16, decay_factor=8.0))

  def inputs(self, method):
    n = method.config.seq_len
    return (*mtb.random_qkv(0, 1, n, n, 2, 2, 16), {})

  def logical_mask(self, method, q, k, kwargs):
    beta, n = method.config.block_size, method.config.seq_len
    blocks = radial.block_mask(method.config)
    mask = np.repeat(np.repeat(blocks, beta, 0), beta, 1)[:n, :n]
    return jnp.asarray(mask)[None, None]

  def test_token_rules(self):
    cfg = radial.RadialConfig(num_frames=10, tokens_per_frame=20,
                              block_size=4, decay_factor=0.3)
    s = cfg.tokens_per_frame
    mask = radial.token_mask(cfg)
    for a in range(cfg.num_frames):
      for b in range(cfg.num_frames):
        want = np.array([[_allowed(cfg, a, x, b, y) for y in range(s)]
                         for x in range(s)])
        np.testing.assert_array_equal(
            mask[a * s:(a + 1) * s, b * s:(b + 1) * s], want)
    # Symmetric in the frame distance away from the sink column.
    video = mask[s:, s:]
    np.testing.assert_array_equal(video, video.T)

  def test_sink_and_text_are_dense(self):
    cfg = radial.RadialConfig(num_frames=8, tokens_per_frame=32,
                              num_text_tokens=16, block_size=16)
    blocks = radial.block_mask(cfg)
    self.assertTrue(blocks[:, :2].all())  # frame 0 = blocks 0, 1
    self.assertTrue(blocks[-1].all() and blocks[:, -1].all())

  def test_dense_warmup_policy(self):
    method = self.make_method()
    q, k, v, _ = self.inputs(method)
    n_blocks = lambda **kw: int(np.asarray(
        method.plan(q, k, v, **kw).layout.kv_cnt).sum())
    full = (CONFIG.seq_len // CONFIG.block_size) ** 2
    self.assertEqual(n_blocks(step=1, layer=3), full)
    self.assertEqual(n_blocks(step=5, layer=0), full)
    self.assertLess(n_blocks(step=5, layer=3), full)

  def test_kept_blocks_grow_like_n_log_n(self):
    kept = []
    for f in (16, 32, 64):
      cfg = radial.RadialConfig(num_frames=f, tokens_per_frame=16,
                                block_size=16, decay_factor=1.0,
                                sink_frame=False)
      kept.append(radial.block_mask(cfg).sum())
    # Dense would grow 4x per doubling; radial grows ~2x (plus log factor).
    self.assertLess(kept[2] / kept[1], 3.0)
    self.assertLess(kept[1] / kept[0], 3.0)


if __name__ == "__main__":
  absltest.main()
