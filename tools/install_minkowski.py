#!/usr/bin/env python3
"""Checkout shortcut for ``sparkme-install-minkowski`` (sparkme/install/minkowski.py): works before the project
itself is installed, e.g. in a conda environment that only has torch."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparkme.install.minkowski import cli  # noqa: E402

if __name__ == "__main__":
    cli()
