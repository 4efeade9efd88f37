"""Offline stand-ins for the public datasets: tiny archives in the real layouts, served from 127.0.0.1.

* :func:`write_msd_task`: an MSD task folder (``Task09_Spleen/dataset.json``, ``imagesTr``, ``labelsTr``, an
  ``imagesTs`` case and a macOS ``._`` file, as the real tars have);
* :func:`write_totalseg_release`: TotalSegmentator's release layout (``sNNNN/ct.nii.gz``,
  ``sNNNN/segmentations/<structure>.nii.gz``, a semicolon-separated ``meta.csv`` with a BOM and ``institute``);
* :class:`ArchiveServer`: an ``http.server`` thread that serves bytes with ``Range`` support, records every
  request's ``Range`` header and can drop a response part-way through its body.
"""

from __future__ import annotations

import json
import re
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from fedseg.common.data.io import Volume, write_volume

SIZE = 16
SPACING = (2.0, 1.5, 1.5)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
#: TotalSegmentator v2 numbering of the structures the test release holds (stomach is one fedseg ignores).
STRUCTURES = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "stomach": 6, "pancreas": 7}
_BLOCKS = {  # where each structure lies in the 16^3 volume
    "spleen": np.s_[3:6, 3:6, 3:6],
    "kidney_right": np.s_[3:6, 9:12, 3:6],
    "kidney_left": np.s_[9:12, 3:6, 3:6],
    "liver": np.s_[9:13, 9:13, 9:13],
    "stomach": np.s_[3:6, 3:6, 9:12],
    "pancreas": np.s_[6:8, 6:9, 6:9],
}


def _volume(array: np.ndarray) -> Volume:
    return Volume(array, SPACING, (0.0, 0.0, 0.0), IDENTITY)


def ct_array(seed: int) -> np.ndarray:
    """Air (-1000 HU) around soft tissue (40 HU with seeded noise)."""
    rng = np.random.default_rng(seed)
    image = np.full((SIZE, SIZE, SIZE), -1000, dtype=np.int16)
    image[2:14, 2:14, 2:14] = 40 + rng.integers(-20, 20, size=(12, 12, 12))
    return image


def write_msd_task(root: Path, cases: int = 6, task: str = "Task09_Spleen") -> Path:
    """An MSD task folder with ``cases`` spleen cases (label 1), one test image and a macOS ``._`` file."""
    folder = root / task
    training = []
    for case in range(cases):
        name = f"spleen_{case}.nii.gz"
        label = np.zeros((SIZE, SIZE, SIZE), np.uint8)
        label[_BLOCKS["spleen"]] = 1
        write_volume(_volume(ct_array(case)), folder / "imagesTr" / name)
        write_volume(_volume(label), folder / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    write_volume(_volume(ct_array(99)), folder / "imagesTs" / "spleen_99.nii.gz")
    (folder / "imagesTr" / "._spleen_0.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    meta = {"name": "Spleen", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
            "numTraining": cases, "training": training, "test": ["./imagesTs/spleen_99.nii.gz"]}  # fmt: skip
    (folder / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


def write_totalseg_release(root: Path, institutes: dict[str, int]) -> Path:
    """A TotalSegmentator-style release: ``institutes`` maps institute -> its number of cases."""
    rows = ["image_id;age;gender;institute;study_type;split"]
    index = 0
    for institute, count in institutes.items():
        for _ in range(count):
            case = root / f"s{index:04d}"
            write_volume(_volume(ct_array(index)), case / "ct.nii.gz")
            for structure in STRUCTURES:
                mask = np.zeros((SIZE, SIZE, SIZE), np.uint8)
                mask[_BLOCKS[structure]] = 1
                write_volume(_volume(mask), case / "segmentations" / f"{structure}.nii.gz")
            rows.append(f"s{index:04d};60;m;{institute};ct abdomen;train")
            index += 1
    (root / "meta.csv").write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    return root


def tar_folder(source: Path, archive: Path, mode: str = "w") -> bytes:
    """Pack ``source``'s contents (paths relative to it) into ``archive``; returns the archive's bytes."""
    with tarfile.open(archive, mode) as tar:
        for path in sorted(source.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(source)), recursive=False)
    return archive.read_bytes()


def zip_folder(source: Path, archive: Path) -> bytes:
    """Zip ``source``'s files (paths relative to it) into ``archive``; returns the archive's bytes."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            zf.write(path, str(path.relative_to(source)))
    return archive.read_bytes()


@dataclass
class ArchiveServer:
    """What the test server holds and saw: files by URL path, the ``Range`` header of each request, and how many
    of the next responses to cut after ``cut_at`` bytes of the body."""

    files: dict[str, bytes] = field(default_factory=dict)
    ranges: list[str | None] = field(default_factory=list)
    cuts: int = 0
    cut_at: int = 0
    honour_range: bool = True
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class _Handler(BaseHTTPRequestHandler):
    state: ArchiveServer  # set on the class built for each server

    def do_GET(self) -> None:
        state = self.state
        header = self.headers.get("Range")
        state.ranges.append(header)
        body = state.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", header).group(1)) if header and state.honour_range else 0  # type: ignore[union-attr]
        if start >= len(body) and header:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        part = body[start:]
        self.send_response(206 if header and state.honour_range else 200)
        if header and state.honour_range:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(part)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if state.cuts > 0:
            state.cuts -= 1
            self.wfile.write(part[: state.cut_at])
            self.close_connection = True  # the socket closes with the body incomplete
            return
        self.wfile.write(part)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def archive_server() -> Iterator[ArchiveServer]:
    """An :class:`ArchiveServer` on 127.0.0.1 (a free port), stopped after the test."""
    state = ArchiveServer()
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


def registry_file(path: Path, name: str, **keys: object) -> Path:
    """A one-entry ``--registry`` file (TOML), values as TOML literals via json (strings, lists, tables)."""
    lines = [f"[datasets.{name}]"]
    for key, value in keys.items():
        if isinstance(value, dict):
            inner = ", ".join(f'"{k}" = {json.dumps(v)}' for k, v in value.items())
            lines.append(f"{key} = {{ {inner} }}")
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
