#!/usr/bin/env python3
"""ImageNet training of MRConvNeXt (and any timm model) with accelerate.

Entry point at the repository root, as timm's scripts; the code is :mod:`mrconvnext.train_imagenet`, which an
installed package runs as ``python -m mrconvnext.train_imagenet``. ``--help`` lists the flags.
"""

import sys

from mrconvnext.train_imagenet import main

if __name__ == "__main__":
    sys.exit(main())
