"""eval/gpu_check.py --quick --dry_run from a bare process: the JSON schema."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl.testing import absltest

_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "eval" / "gpu_check.py"
_HEADER = {"script", "date", "device", "platform", "dry_run", "versions",
           "args", "unverified_backends", "correctness", "benchmarks",
           "elapsed_s"}
_BENCH = {"kind", "impl", "d", "t", "mode", "density", "heads", "block",
          "dtype", "status", "wall_s"}


def _run(*flags, cwd):
  # A clean environment without the repository on PYTHONPATH: the script
  # must find the project itself.
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "OUT")}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, str(_SCRIPT), *flags], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=300,
                        check=False)


class GpuCheckTest(absltest.TestCase):

  def test_help(self):
    with tempfile.TemporaryDirectory() as tmp:
      proc = _run("--help", cwd=tmp)
    self.assertEqual(proc.returncode, 0, proc.stderr)
    self.assertIn("--dry_run", proc.stdout)

  def test_quick_dry_run_writes_schema(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = pathlib.Path(tmp) / "check.json"
      # mosaic_gpu only lowers (fast); a tiny budget skips the tail.
      proc = _run("--quick", "--dry_run", "--backends", "mosaic_gpu",
                  "--head_dims", "64", "--time_budget_s", "15",
                  "--correctness_budget_s", "6",
                  "--out", str(out), cwd=tmp)
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      data = json.loads(out.read_text())
    self.assertContainsSubset(_HEADER, set(data))
    self.assertTrue(data["dry_run"])
    self.assertEqual(data["unverified_backends"], ["mosaic_gpu"])
    lowered = [r for r in data["correctness"] if r["status"] == "ok"]
    self.assertNotEmpty(lowered)
    self.assertTrue(all(r["lowered"] and not r["verified"] for r in lowered))
    rows = data["benchmarks"]
    self.assertNotEmpty(rows)
    for row in rows:
      self.assertContainsSubset(_BENCH - {"wall_s"}, set(row))
    # The dense-mode rows come first, cuDNN (XLA stand-in here) leading.
    self.assertEqual((rows[0]["impl"], rows[0]["kind"]), ("cudnn", "dense"))
    timed = [r for r in rows if r["status"] == "ok" and "ms" in r]
    self.assertNotEmpty(timed)
    for row in timed:
      self.assertContainsSubset({"ms", "dense_equiv_tflops",
                                 "effective_tflops"}, set(row))
    self.assertTrue(all(r["status"] in ("ok", "skipped: time budget")
                        for r in rows), rows)


if __name__ == "__main__":
  absltest.main()
