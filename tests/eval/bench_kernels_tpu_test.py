"""eval/bench_kernels.py --tpu: the splash comparison, in interpret mode."""

import json
import pathlib
import tempfile

from absl.testing import absltest

from eval import bench_kernels

_ROW = {"section", "layout", "density", "actual_density", "kmax", "mode",
        "max_abs_diff_vs_splash", "mosaic_tpu_s", "splash_s", "xla_dense_s",
        "op_over_splash", "op_over_xla_dense"}


def _run(*flags):
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "tpu.json"
    bench_kernels.main(["--tpu", "--dry_run", "--reps", "1", "--out",
                        str(out), *flags])
    return json.loads(out.read_text())


class BenchKernelsTpuTest(absltest.TestCase):

  def test_dry_run_agrees_with_splash(self):
    data = _run("--layouts", "random,causal_window", "--densities", "0.25",
                "--modes", "fwd,fwd_bwd")
    self.assertTrue(data["dry_run"])
    self.assertEqual(data["shapes"]["dtype"], "bf16")
    self.assertEqual(data["skipped"], [])
    rows = data["results"]
    # Dense mode (full, causal), then the sweep; fwd and fwd+bwd each.
    self.assertEqual([(r["section"], r["layout"]) for r in rows[::2]],
                     [("dense", "full"), ("dense", "causal"),
                      ("density_sweep", "random"),
                      ("density_sweep", "causal_window")])
    for row in rows:
      self.assertContainsSubset(_ROW, set(row))
      # The same masks: outputs agree to bf16 rounding.
      self.assertLess(row["max_abs_diff_vs_splash"], 0.02, row)
    self.assertLess(rows[4]["actual_density"], 0.5)

  def test_time_budget_skips_the_rest(self):
    data = _run("--layouts", "random", "--densities", "0.5", "--modes",
                "fwd", "--time_budget_s", "0")
    self.assertEqual(data["results"], [])
    self.assertEqual(data["skipped"], ["dense/full@1.0", "dense/causal@0.5",
                                       "density_sweep/random@0.5"])

  def test_needs_a_tpu_or_dry_run(self):
    with self.assertRaisesRegex(SystemExit, "needs a TPU host"):
      bench_kernels.main(["--tpu"])
    with self.assertRaises(SystemExit):  # argparse: --dry_run needs --tpu
      bench_kernels.main(["--dry_run"])


if __name__ == "__main__":
  absltest.main()
