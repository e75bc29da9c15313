"""What CPU a benchmark ran on, for its JSON.

CPU ratios move with the host class: the same commit's SEA at T=8192 takes
0.21x dense attention on a 2-core AMD EPYC (Zen 3, AVX2) and 0.32-0.34x on a
2-core Intel Xeon with AVX-512 and AMX, where its memory-bound gathers and
searches are slower against dense's matmuls. A result that names the
processor can be compared with one from the same class only.
"""

from __future__ import annotations

import os
import pathlib
import platform

# The vector extensions that change which CPU code paths are fast.
FEATURES_OF_NOTE = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def describe(cpuinfo: str | None = None) -> dict:
  """{model, machine, logical_cpus, features}: this machine's processor.

  Args:
    cpuinfo: the text of /proc/cpuinfo; read from the system when None.
      Where it is not there (not Linux), model falls back to
      `platform.processor()` and features are left empty.
  """
  if cpuinfo is None:
    path = pathlib.Path("/proc/cpuinfo")
    cpuinfo = path.read_text() if path.exists() else ""
  model, flags = platform.processor() or platform.machine(), set()
  for line in cpuinfo.splitlines():
    name, _, value = line.partition(":")
    name = name.strip()
    if name == "model name":
      model = value.strip()
    elif name == "flags":
      flags = set(value.split())
      break
  return dict(model=model, machine=platform.machine(),
              logical_cpus=os.cpu_count(),
              features=[f for f in FEATURES_OF_NOTE if f in flags])
