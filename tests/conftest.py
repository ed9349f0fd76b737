"""pytest configuration: makes tests/helpers.py importable as `helpers`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Fixtures shared by several test files: pytest finds them here.
from certs import certs  # noqa: E402,F401
