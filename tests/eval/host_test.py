"""eval/host.py: the processor a benchmark names."""

from absl.testing import absltest

from eval import host

_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Example CPU @ 2.00GHz
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16
processor\t: 1
model name\t: Example CPU @ 2.00GHz
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16
"""


class HostTest(absltest.TestCase):

  def test_reads_model_and_features_of_note(self):
    info = host.describe(_CPUINFO)
    self.assertEqual(info["model"], "Example CPU @ 2.00GHz")
    # The first processor's flags, in FEATURES_OF_NOTE order.
    self.assertEqual(info["features"], ["avx2", "avx512f", "avx512_bf16"])
    self.assertGreaterEqual(info["logical_cpus"], 1)

  def test_without_cpuinfo(self):
    info = host.describe("")
    self.assertEqual(info["features"], [])
    self.assertIsInstance(info["model"], str)

  def test_this_machine(self):
    info = host.describe()
    self.assertTrue(info["model"])
    self.assertTrue(info["machine"])
    self.assertTrue(set(info["features"]) <= set(host.FEATURES_OF_NOTE))


if __name__ == "__main__":
  absltest.main()
