#!/usr/bin/env python3
"""Runs emailrelay from a copied source tree: `./emailrelay.py [options]`.

Puts this file's directory first on the module path so the `emailrelay`
package next to it is the one used, whatever is installed elsewhere.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))

from emailrelay.main import entry  # noqa: E402 (needs the path set above)

if __name__ == "__main__":
    raise SystemExit(entry())
