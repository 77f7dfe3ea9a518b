"""Ops and layers: FFT long convolution, sub-kernels, branch BatchNorm, MRConv (train and deploy forms), LongConv."""

from .branch_norm import BranchBatchNorm
from .fft_conv import fft_conv, fft_length, kernel_spectrum
from .kernels import KERNEL_TYPES, create_kernel, merge_kernels
from .long_conv import LONG_CONV_METHODS, LongConv
from .mrconv import MRConv, MRConv2d, resolution_lengths

__all__ = [
    "KERNEL_TYPES",
    "LONG_CONV_METHODS",
    "BranchBatchNorm",
    "LongConv",
    "MRConv",
    "MRConv2d",
    "create_kernel",
    "fft_conv",
    "fft_length",
    "kernel_spectrum",
    "merge_kernels",
    "resolution_lengths",
]
