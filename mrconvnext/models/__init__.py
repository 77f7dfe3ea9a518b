"""Models registered with timm's registry on import."""

from .mrconvnext import *  # noqa: F403
from .sequence import MRConvSequenceBlock, MRConvSequenceModel  # noqa: F401
