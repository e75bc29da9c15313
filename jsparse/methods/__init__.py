"""The method registry: lower-case paper acronym -> SparseMethod class.

An explicit dict (no import-time magic): adding a method is one file, one
line here and one test.
"""

from jsparse.methods.base import SparseMethod as SparseMethod
from jsparse.methods.base import SparsePlan as SparsePlan
from jsparse.methods import blade
from jsparse.methods import dma
from jsparse.methods import hip
from jsparse.methods import hmar
from jsparse.methods import llsa
from jsparse.methods import moa
from jsparse.methods import pemf
from jsparse.methods import psa
from jsparse.methods import radial
from jsparse.methods import sea
from jsparse.methods import setrec
from jsparse.methods import sparsifiner
from jsparse.methods import swinbert

METHODS: dict[str, type[SparseMethod]] = {
    "dma": dma.DMAMethod,
    "llsa": llsa.LLSAMethod,
    "moa": moa.MoAMethod,
    "radial": radial.RadialMethod,
    "hmar": hmar.HMARMethod,
    "setrec": setrec.SETRecMethod,
    "swinbert": swinbert.SwinBERTMethod,
    "pemf": pemf.PEMFMethod,
    "hip": hip.HiPMethod,
    "sea": sea.SEAMethod,
    "psa": psa.PSAMethod,
    "blade": blade.BladeMethod,
    "sparsifiner": sparsifiner.SparsifinerMethod,
}
