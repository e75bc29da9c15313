"""Block sizes and launch parameters of the Pallas backends.

One frozen dataclass per backend, each with `get_default()`. Tuned values are
keyed by shape buckets (never exact shapes).
"""

from __future__ import annotations
