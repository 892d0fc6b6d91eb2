"""The code version a run records, so that numbers of different code are never mixed unawares.

The version is the package's ``__version__`` plus a hash of its source: every ``.py`` and ``.c`` file of
the package, by relative path and content. Unlike a git commit it needs no git, is the same in a checkout
and an installed copy of the same files, and changes with uncommitted edits, which a commit hash would not
show. Recipes are left out: a run folder records its whole resolved recipe, which is compared on its own.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
SOURCES = ("*.py", "*.c")
"""The files whose content is the code version: Python source and native kernels."""


@lru_cache(maxsize=1)
def code_version() -> str:
    """``<__version__>+<first 12 hex digits of the source hash>``, e.g. ``0.3.0+3f9a0c1d2e4b``; computed once
    per process (the files a running process imported are the ones it runs)."""
    from . import __version__

    digest = hashlib.sha256()
    files = sorted({p for pattern in SOURCES for p in PACKAGE.rglob(pattern) if "__pycache__" not in p.parts})
    for path in files:
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{__version__}+{digest.hexdigest()[:12]}"
