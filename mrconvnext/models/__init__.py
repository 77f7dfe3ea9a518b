"""Models registered with timm's registry on import, and the ConvNeXt -> MRConvNeXt weight conversion."""

from .convnext_conversion import calibrate_batchnorm, convert_convnext, stage_wraparound, wraparound_fraction
from .mrconvnext import *  # noqa: F403
from .sequence import MRConvSequenceBlock, MRConvSequenceModel  # noqa: F401

__all__ = [  # noqa: F405
    "MRConvNeXt",
    "MRConvSequenceBlock",
    "MRConvSequenceModel",
    "calibrate_batchnorm",
    "convert_convnext",
    "stage_wraparound",
    "wraparound_fraction",
]
