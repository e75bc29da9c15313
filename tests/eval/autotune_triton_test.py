"""Selection logic of eval/autotune_triton.py with a fake timer (no GPU)."""

import argparse
import dataclasses
import math

from absl.testing import absltest
import jax.numpy as jnp

from eval import autotune_triton


def _args():
  return argparse.Namespace(seq_len=256, num_heads=2, block=64, reps=1)


class SelectTest(absltest.TestCase):

  def test_failing_candidate_is_logged_and_never_chosen(self):
    base = autotune_triton.config_lib.TritonConfig()
    broken = dataclasses.replace(base, num_stages=4)
    slow = dataclasses.replace(base, num_stages=2)
    fast = dataclasses.replace(base, num_stages=3)
    times = {2: 2.0, 3: 1.0}

    def score(cfg):
      if cfg.num_stages == 4:
        raise TypeError("missing dlse")
      return times[cfg.num_stages]

    log = []
    self.assertEqual(autotune_triton.select([broken, slow, fast], score, log),
                     fast)
    self.assertIn("TypeError", log[0]["error"])
    self.assertNotIn("seconds", log[0])
    self.assertEqual([e.get("seconds") for e in log[1:]], [2.0, 1.0])

  def test_all_failing_gives_none(self):
    def score(cfg):
      raise RuntimeError(f"lowering failed for {cfg.num_stages}")

    log = []
    cands = [autotune_triton.config_lib.TritonConfig()]
    self.assertIsNone(autotune_triton.select(cands, score, log))
    self.assertLen(log, 1)


class TuneBucketTest(absltest.TestCase):

  def test_stages_tuned_separately(self):
    """dq, dk/dv and launch fields each come from their own stage's best."""
    calls = []

    def timer(cfg, layout, q, k, v, dout, spec, *, with_bwd, reps):
      del layout, q, k, v, dout, spec, reps
      calls.append(with_bwd)
      seconds = 10.0
      # Cheapest forward: 128x128, 3 stages. Backward favours distinct tiles.
      seconds -= (cfg.block_q, cfg.block_kv, cfg.num_stages) == (128, 128, 3)
      if with_bwd:
        seconds -= (cfg.dq_block_q, cfg.dq_block_kv) == (128, 64)
        seconds -= (cfg.dkv_block_kv, cfg.dkv_block_q) == (64, 128)
        seconds -= (cfg.bwd_num_warps, cfg.bwd_num_stages) == (8, 3)
        if cfg.bwd_num_stages == 4:
          raise ValueError("smem exhausted")
      return seconds

    best, timings = autotune_triton.tune_bucket(64, jnp.bfloat16, _args(),
                                                timer=timer)
    self.assertEqual(
        (best["block_q"], best["block_kv"], best["num_stages"],
         best["dq_block_q"], best["dq_block_kv"], best["dkv_block_kv"],
         best["dkv_block_q"], best["bwd_num_warps"], best["bwd_num_stages"]),
        (128, 128, 3, 128, 64, 64, 128, 8, 3))
    self.assertEqual([s["stage"] for s in timings],
                     ["fwd", "dq", "dkv", "bwd_launch"])
    errors = [e for s in timings for e in s["candidates"] if "error" in e]
    self.assertNotEmpty(errors)
    self.assertTrue(all(math.isfinite(e["seconds"]) for s in timings
                        for e in s["candidates"] if "error" not in e))
    self.assertIn(True, calls)

  def test_candidates_include_128x128_with_3_and_4_stages(self):
    fwd = {(c[0], c[1], c[3]) for c in autotune_triton.FWD_CANDIDATES}
    self.assertContainsSubset({(128, 128, 3), (128, 128, 4)}, fwd)

  def test_time_config_runs_the_backward(self):
    """The real timer on CPU (interpret mode): backward gets its dlse."""
    cfg = autotune_triton.config_lib.TritonConfig(
        block_q=32, block_kv=32, dq_block_q=32, dq_block_kv=32,
        dkv_block_kv=32, dkv_block_q=32)
    spec = autotune_triton.tile_math.MaskSpec(
        q_len=64, kv_len=64, kv_len_padded=64, band=None, has_segments=False,
        has_tiles=False, sm_scale=0.25, softcap=None)
    q = jnp.ones((1, 64, 1, 16), jnp.float32)
    layout = autotune_triton.layouts(64, 1, 32)[1]
    seconds = autotune_triton.time_config(cfg, layout, q, q, q, q, spec,
                                          with_bwd=True, reps=1)
    self.assertGreater(seconds, 0.0)

  def test_bucket_not_written_when_all_fail(self):
    def timer(*args, **kwargs):
      raise TypeError("backward() missing 1 required positional argument")

    best, timings = autotune_triton.tune_bucket(64, jnp.bfloat16, _args(),
                                                timer=timer)
    self.assertIsNone(best)
    self.assertEqual([s["stage"] for s in timings], ["fwd"])


if __name__ == "__main__":
  absltest.main()
