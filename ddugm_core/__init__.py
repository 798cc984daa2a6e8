"""DD-UGM reconstruction library: score-based dual-domain reconstruction of cine MRI.

Public entry: ``from ddugm_core import Reconstructor, ReconConfig``.
No Gadgetron or ISMRMRD imports live in this package.
"""
__version__ = "0.1.0"

#: The largest k-space sample (either real component) a reconstruction takes: its square times a
#: hundred million samples stays within single precision (3.4e38). Scanner data are far below it.
#: Here, without torch, so that the gadgets' numpy-only k-space reader shares it.
MAX_SAMPLE = 1e15


def __getattr__(name):  # lazy, so that `ddugm train` does not build the sampler stack
    if name in ("Reconstructor", "ReconConfig"):
        from . import reconstruction

        return getattr(reconstruction, name)
    raise AttributeError(name)


__all__ = ["Reconstructor", "ReconConfig", "__version__"]
