"""A dataset's own record of where each case comes from (TotalSegmentator's ``meta.csv``: ``institute``)."""

from __future__ import annotations

import csv
from pathlib import Path

from fedseg.common.datasets.registry import InstitutionField
from fedseg.common.errors import DataError


def read_institutions(dataset: Path, spec: InstitutionField) -> dict[str, str]:
    """Case id -> institution, from the table ``spec`` names in the ``dataset`` folder.

    Raises:
        DataError: the table is missing, unreadable, or lacks the case or institution column.
    """
    path = dataset / spec.file
    try:
        with path.open(encoding="utf-8-sig", newline="") as table:  # utf-8-sig: TotalSegmentator's file has a BOM
            rows = list(csv.DictReader(table, delimiter=spec.delimiter))
    except FileNotFoundError:
        raise DataError(f"{path}: missing; fetch the dataset again (it holds each case's institution)") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read the institution table ({err})") from None
    columns = set(rows[0]) if rows else set()
    absent = [c for c in (spec.case_column, spec.column) if c not in columns]
    if absent:
        raise DataError(f"{path}: no column {absent[0]!r} (found {', '.join(sorted(columns)) or 'no rows'})")
    return {row[spec.case_column].strip(): row[spec.column].strip() for row in rows}
