#!/usr/bin/env python3
"""Training of the MRConv sequence models on LRA, sCIFAR and Speech Commands.

Entry point at the repository root, as timm's scripts; the code is :mod:`mrconvnext.train_sequence`, which an
installed package runs as ``python -m mrconvnext.train_sequence``. ``--help`` lists the flags.
"""

import sys

from mrconvnext.train_sequence import main

if __name__ == "__main__":
    sys.exit(main())
