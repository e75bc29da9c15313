"""viz: layouts and masks render to PNG files."""

import os
import tempfile

from absl.testing import absltest
import numpy as np

from jsparse import viz
from pallas_kernels import BlockLayout


class VizTest(absltest.TestCase):

  def test_writes_png(self):
    layout = BlockLayout.causal(64, block_q=16, block_kv=16)
    with tempfile.TemporaryDirectory() as tmp:
      for name, write in (("l.png", lambda p: viz.save_layout(layout, p)),
                          ("m.png", lambda p: viz.save_mask(
                              np.tril(np.ones((8, 8), bool)), p, block=4))):
        path = os.path.join(tmp, name)
        write(path)
        with open(path, "rb") as f:
          self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    np.testing.assert_array_equal(viz.layout_image(layout),
                                  np.array(layout.to_block_mask())[0, 0])


if __name__ == "__main__":
  absltest.main()
