"""eval/fidelity.py: densities of block and row plans, dense first layers."""

from __future__ import annotations

import json
import os
import tempfile

from absl.testing import absltest
import jax
import numpy as np

from eval import fidelity
from jsparse.methods import base
from pallas_kernels import layout as layout_lib
from pallas_kernels import row_layout as row_layout_lib

_T, _H, _D = 64, 2, 8


def _qkv(seed, t):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(key, (1, t, _H, _D)) for key in keys)


class PlanDensityTest(absltest.TestCase):

  def test_causal_block_layout_is_dense(self):
    plan = base.SparsePlan(
        layout=layout_lib.BlockLayout.from_band(_T, _T, 16, 16, (None, 0)),
        causal=True)
    self.assertAlmostEqual(fidelity.plan_density(plan, _T, _T, _H, True),
                           1.0)

  def test_row_layout_counts_listed_visible_keys(self):
    # Row t lists keys t-w+1 .. t+w (the last w are future, cut by causal).
    w = 5
    rows = np.arange(_T)[:, None]
    idx = rows + np.arange(-w + 1, w + 1)[None]
    cnt = np.full((1, 1, _T), 2 * w, np.int32)
    idx = np.where((idx >= 0) & (idx < _T), idx, _T)  # padding
    layout = row_layout_lib.RowLayout.from_indices(
        idx[None, None].astype(np.int32), cnt, num_keys=_T)
    plan = base.SparsePlan(layout=layout, causal=True)
    want = np.minimum(np.arange(_T) + 1, w).sum() / (_T * (_T + 1) / 2)
    self.assertAlmostEqual(fidelity.plan_density(plan, _T, _T, _H, True),
                           want, places=6)

  def test_mean_density_passes_the_layer_to_dense_first_layers(self):
    t = 512  # past the window (64) and the budget (16 keys)
    hip = fidelity._hip_paper(16, t, _H)
    qkv = [_qkv(0, t), _qkv(1, t)]
    dense_layer = fidelity.HIP_PAPER_DENSE_LAYERS - 1
    sparse_layer = fidelity.HIP_PAPER_DENSE_LAYERS
    self.assertAlmostEqual(
        fidelity.mean_density([hip], qkv[:1], [dense_layer]), 1.0)
    sparse = fidelity.mean_density([hip], qkv[1:], [sparse_layer])
    self.assertLess(sparse, 1.0)
    self.assertAlmostEqual(
        fidelity.mean_density([hip, hip], qkv, [dense_layer, sparse_layer]),
        (1.0 + sparse) / 2, places=6)


class MergedReportTest(absltest.TestCase):

  def _report(self, dense_ppl):
    return {"smollm2_ppl": {"dense": {"density": 1.0, "ppl": dense_ppl},
                            "moa": {"0.25": {"error": "infeasible"}},
                            "hip": {"0.25": {"density": 0.2, "ppl": 40.0}}},
            "minilm_cosine": {"window": {}}}

  def test_update_replaces_the_families_run_and_keeps_the_rest(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "f.json")
      with open(path, "w") as f:
        json.dump(self._report(34.5), f)
      new = {"dense": {"density": 1.0, "ppl": 34.5},
             "moa": {"0.25": {"density": 0.24, "ppl": 36.0}}}
      report = fidelity._merged(path, new, {}, {"command": "c"})
      self.assertEqual(report["smollm2_ppl"]["moa"]["0.25"]["ppl"], 36.0)
      self.assertEqual(report["smollm2_ppl"]["hip"]["0.25"]["ppl"], 40.0)
      self.assertEqual(report["updates"], [{"command": "c"}])
      with self.assertRaisesRegex(ValueError, "dense perplexity"):
        fidelity._merged(path, {"dense": {"ppl": 30.0}}, {}, {})


if __name__ == "__main__":
  absltest.main()
