"""mrconvnext: reparameterized multi-resolution convolutions (MRConv) for timm.

Importing the package registers its models with timm's registry. Layout (as timm's): ops and layers in
:mod:`mrconvnext.layers`, models in :mod:`mrconvnext.models`, readers in :mod:`mrconvnext.data`, training /
evaluation / checkpoint / export helpers in :mod:`mrconvnext.utils`, and the tools a user runs as
``python -m mrconvnext.<tool>`` (``train_imagenet``, ``train_sequence``, ``validate``, ``export``, ``convert``,
``plot``, ``demo``, ``selfcheck``) at the top of the package.
"""

from . import models  # noqa: F401  (registers the models with timm)
from .layers import (
    KERNEL_TYPES,
    LongConv,
    MRConv,
    MRConv2d,
    create_kernel,
    fft_conv,
    fft_length,
    kernel_spectrum,
    resolution_lengths,
)
from .utils.optim import mrconv_param_groups

__version__ = "0.1.0"

__all__ = [
    "KERNEL_TYPES",
    "LongConv",
    "MRConv",
    "MRConv2d",
    "create_kernel",
    "fft_conv",
    "fft_length",
    "kernel_spectrum",
    "mrconv_param_groups",
    "resolution_lengths",
]
