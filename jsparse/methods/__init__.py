"""The method registry: lower-case paper acronym -> SparseMethod class.

An explicit dict (no import-time magic): adding a method is one file, one
line here and one test.
"""

from jsparse.methods.base import SparseMethod as SparseMethod
from jsparse.methods.base import SparsePlan as SparsePlan

METHODS: dict[str, type[SparseMethod]] = {}
