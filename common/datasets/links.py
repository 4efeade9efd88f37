"""Put a source file into a split without copying it where the file system allows.

Tried in order: a hard link (same file system: the split keeps working if the fetched dataset is moved or
deleted, and uses no space), a symbolic link to the absolute source path (another file system), a copy (a file
system without links). The caller reports which one each file got.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

LinkMethod = Literal["hard link", "symlink", "copy"]


def place(source: Path, dest: Path) -> LinkMethod:
    """Make ``dest`` (absent) show ``source``'s content; returns how."""
    try:
        os.link(source, dest)
        return "hard link"
    except OSError:
        pass
    try:
        dest.symlink_to(source.resolve())
        return "symlink"
    except OSError:
        shutil.copy2(source, dest)
        return "copy"
