"""timm model registrations of mrconvnext."""

from .sequence import MRConvSequenceBlock, MRConvSequenceModel

__all__ = ["MRConvSequenceBlock", "MRConvSequenceModel"]
