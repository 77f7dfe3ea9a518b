"""Training transforms: timm's ``create_transform`` with its auto-augment ops made safe for current Pillow.

timm's RandAugment maps the top magnitude of ``PosterizeIncreasing`` (and the lowest of ``Posterize``) to
keeping 0 bits, which TensorFlow's posterize and Pillow < 13 turn into a black image and Pillow >= 13
rejects (``ValueError: bits must be between or equal to 1 and 8``): with the ConvNeXt recipe's
``rand-m9-mstd0.5-inc1`` about one image in 650 hits it and kills the data loader.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torchvision.transforms as T
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_auto_augment
from timm.data import create_transform

__all__ = ["create_train_transform", "posterize"]


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the ``bits_to_keep`` most significant bits of every channel; 0 bits gives a black image."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _augment_ops(transform: Any) -> Iterator[timm_auto_augment.AugmentOp]:
    """timm's auto-augment ops inside ``transform`` (Compose, RandAugment, AutoAugment policies, AugMix)."""
    if isinstance(transform, timm_auto_augment.AugmentOp):
        yield transform
    elif isinstance(transform, (list, tuple)):
        for item in transform:
            yield from _augment_ops(item)
    else:
        for attr in ("transforms", "ops", "policy"):
            children = getattr(transform, attr, None)
            if isinstance(children, (list, tuple)):
                yield from _augment_ops(children)


def create_train_transform(input_size: int | tuple[int, ...], **kwargs: Any) -> T.Compose:
    """``timm.data.create_transform(input_size, is_training=True, **kwargs)`` whose posterize ops accept 0 bits."""
    transform = create_transform(input_size, is_training=True, **kwargs)
    for op in _augment_ops(transform):
        if op.aug_fn is timm_auto_augment.posterize:
            op.aug_fn = posterize
    return transform
