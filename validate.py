#!/usr/bin/env python3
"""ImageNet-style validation of MRConvNeXt (and any timm model), train or deploy form.

Entry point at the repository root, as timm's scripts; the code is :mod:`mrconvnext.validate`, which an
installed package runs as ``python -m mrconvnext.validate``. ``--help`` lists the flags.
"""

import sys

from mrconvnext.validate import main

if __name__ == "__main__":
    sys.exit(main())
