"""An export's output folder appears whole or not at all: files go to a hidden sibling, renamed into place last."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedseg.common.errors import ConfigError


def check_new(out: Path) -> None:
    """Raise unless ``out`` does not exist yet and its parent is a folder.

    Raises:
        ConfigError: ``out`` exists, or its parent is missing or not a folder.
    """
    if out.exists() or out.is_symlink():
        raise ConfigError(f"--out {out} already exists; pass a new folder (the export never overwrites one)")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist; create it first")


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Yield a hidden folder beside ``out`` to write into; on success it becomes ``out``, on failure it is removed.

    Raises:
        ConfigError: ``out`` exists (before or, written by someone else, after the export).
    """
    check_new(out)
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    folder.chmod(0o777 & ~_umask())  # mkdtemp's folder is private; the export is an ordinary folder
    try:
        yield folder
        if out.exists():
            raise ConfigError(f"--out {out} appeared while exporting; the export was not written")
        os.rename(folder, out)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
