"""Test support: a fresh interpreter made to look like a lent GPU box, without Hugging Face ``datasets``.

Used in subprocesses (the package must be imported after ``datasets`` is hidden), so that nothing here
leaks into the test session.
"""

from __future__ import annotations

import sys


def hide_datasets() -> None:
    """Makes ``import datasets`` fail as it does where the package is not installed (and
    ``importlib.util.find_spec("datasets")`` answer None, as libraries probing for it expect)."""
    sys.modules["datasets"] = None
