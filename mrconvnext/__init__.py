"""mrconvnext: reparameterized multi-resolution convolutions (MRConv) for timm.

Importing the package registers its models with timm's registry.
"""

from . import models  # noqa: F401  (registers the models with timm)
from .fft_conv import fft_conv, fft_length, kernel_spectrum
from .kernels import KERNEL_TYPES, create_kernel
from .mrconv import MRConv, MRConv2d, resolution_lengths
from .optim import mrconv_param_groups

__version__ = "0.1.0"

__all__ = [
    "KERNEL_TYPES",
    "MRConv",
    "MRConv2d",
    "create_kernel",
    "fft_conv",
    "fft_length",
    "kernel_spectrum",
    "mrconv_param_groups",
    "resolution_lengths",
]
