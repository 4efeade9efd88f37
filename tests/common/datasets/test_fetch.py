"""`fed-eval datasets fetch` against a local HTTP server: resume, checksums, what is left behind, the result."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseg.common.cli.main import app
from fedseg.common.data.layouts import discover_cases
from fedseg.common.data.manifest import load_manifest
from fedseg.common.datasets.checksum import Digests
from fedseg.common.datasets.download import download
from fedseg.common.errors import DataError
from tests.common.datasets.conftest import ArchiveServer, registry_file, tar_folder, write_msd_task

runner = CliRunner()
TAR = "/Task09_Spleen.tar"


@pytest.fixture
def spleen_tar(tmp_path: Path, archive_server: ArchiveServer) -> bytes:
    """The MSD spleen test task as a tar, served at :data:`TAR`."""
    source = tmp_path / "source"
    write_msd_task(source)
    body = tar_folder(source, tmp_path / "Task09_Spleen.tar")
    archive_server.files[TAR] = body
    return body


def _fetch(tmp_path: Path, server: ArchiveServer, *extra: str, **keys: object) -> tuple[int, str]:
    registry = registry_file(tmp_path / "mirror.toml", "msd-spleen", url=server.url(TAR), **keys)
    args = ["datasets", "fetch", "msd-spleen", "--out", str(tmp_path / "data"), "--registry", str(registry), *extra]
    result = runner.invoke(app, args)
    return result.exit_code, result.output


def _error_line(output: str) -> str:
    """The command's one error line (the last line; no traceback, no other error line before it)."""
    lines = output.splitlines()
    assert "Traceback" not in output and [line for line in lines if line.startswith("error:")] == lines[-1:]
    return lines[-1]


def test_a_cut_connection_resumes_with_range_and_the_dataset_is_complete(
    tmp_path: Path, archive_server: ArchiveServer, spleen_tar: bytes
) -> None:
    archive_server.cuts, archive_server.cut_at = 1, len(spleen_tar) // 2
    code, output = _fetch(tmp_path, archive_server, sha256=hashlib.sha256(spleen_tar).hexdigest())
    assert code == 0, output
    half = len(spleen_tar) // 2
    assert archive_server.ranges == [None, f"bytes={half}-"]  # the second request asked for the rest only
    assert f"resumed with HTTP Range at byte {half:,}" in output
    dataset = tmp_path / "data" / "msd-spleen"
    record = json.loads((dataset / "fedseg-dataset.json").read_text())
    assert record["sha256"] == hashlib.sha256(spleen_tar).hexdigest() and record["cases"] == 6
    assert len(discover_cases(dataset)) == 6
    manifest = load_manifest(dataset / "labels.toml")
    assert manifest.annotated == ["spleen"] and manifest.labels == {1: "spleen"}
    assert not (dataset / "imagesTr" / "._spleen_0.nii.gz").exists()  # macOS junk is never unpacked
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["msd-spleen"]  # no working folder left


def test_the_published_md5_is_checked_and_recorded(
    tmp_path: Path, archive_server: ArchiveServer, spleen_tar: bytes
) -> None:
    code, output = _fetch(tmp_path, archive_server, md5=hashlib.md5(spleen_tar).hexdigest())
    assert code == 0, output
    assert "verified by md5" in output and archive_server.ranges == [None]
    record = json.loads((tmp_path / "data" / "msd-spleen" / "fedseg-dataset.json").read_text())
    assert record["verified_by"].startswith("md5")
    again, output = _fetch(tmp_path, archive_server, md5=hashlib.md5(spleen_tar).hexdigest())
    assert again == 0 and "already fetched" in output and archive_server.ranges == [None]  # nothing downloaded


def test_a_part_kept_by_an_earlier_run_is_resumed(
    tmp_path: Path, archive_server: ArchiveServer, spleen_tar: bytes
) -> None:
    work = tmp_path / "data" / ".msd-spleen.fetch"
    work.mkdir(parents=True)
    kept = len(spleen_tar) // 3
    (work / "Task09_Spleen.tar").write_bytes(spleen_tar[:kept])
    code, output = _fetch(tmp_path, archive_server, sha256=hashlib.sha256(spleen_tar).hexdigest())
    assert code == 0, output
    assert archive_server.ranges == [f"bytes={kept}-"]  # one request, for the missing bytes only


@pytest.mark.parametrize("algorithm", ["md5", "sha256"])
def test_a_checksum_mismatch_is_one_line_and_leaves_nothing(
    tmp_path: Path, archive_server: ArchiveServer, spleen_tar: bytes, algorithm: str
) -> None:
    wrong = hashlib.new(algorithm, b"another file").hexdigest()
    code, output = _fetch(tmp_path, archive_server, **{algorithm: wrong})
    assert code == 1
    assert _error_line(output).startswith("error: Task09_Spleen.tar: ")
    assert f"{algorithm.upper()} is {hashlib.new(algorithm, spleen_tar).hexdigest()}" in output
    assert f"the registry says {wrong}" in output
    assert not (tmp_path / "data").exists()  # neither the download nor anything unpacked is left


def test_no_checksum_needs_no_verify_and_then_prints_the_sha256(
    tmp_path: Path, archive_server: ArchiveServer, spleen_tar: bytes
) -> None:
    mirror = dict(organs=["spleen"], licence="CC BY-SA 4.0", layout="msd", labels={"1": "spleen"})
    registry = registry_file(tmp_path / "new.toml", "my-spleen", url=archive_server.url(TAR), **mirror)
    args = ["datasets", "fetch", "my-spleen", "--out", str(tmp_path / "data"), "--registry", str(registry)]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1
    assert "cannot be verified" in _error_line(refused.output) and "--no-verify" in refused.output
    assert archive_server.ranges == []  # refused before any byte was asked for
    fetched = runner.invoke(app, [*args, "--no-verify"])
    assert fetched.exit_code == 0, fetched.output
    assert "NOT verified" in fetched.output and hashlib.sha256(spleen_tar).hexdigest() in fetched.output


def test_an_existing_folder_not_written_by_fetch_is_not_touched(
    tmp_path: Path, archive_server: ArchiveServer, spleen_tar: bytes
) -> None:
    mine = tmp_path / "data" / "msd-spleen"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("a site's own file")
    code, output = _fetch(tmp_path, archive_server, sha256=hashlib.sha256(spleen_tar).hexdigest())
    assert code == 1 and "fed-eval datasets fetch did not write it" in output
    assert (mine / "notes.txt").read_text() == "a site's own file" and archive_server.ranges == []


def test_an_http_error_is_one_line(tmp_path: Path, archive_server: ArchiveServer) -> None:
    code, output = _fetch(tmp_path, archive_server, sha256="0" * 64)
    assert code == 1 and "HTTP 404" in _error_line(output)


def test_a_server_that_ignores_range_is_read_again_from_the_start(
    tmp_path: Path, archive_server: ArchiveServer, spleen_tar: bytes
) -> None:
    archive_server.honour_range = False
    part = tmp_path / "part.tar"
    part.write_bytes(b"stale bytes of some other file")
    digests = Digests()
    report = download(archive_server.url(TAR), part, digests, backoff=0.0)
    assert part.read_bytes() == spleen_tar and report.size == len(spleen_tar)
    assert digests.hexdigest("sha256") == hashlib.sha256(spleen_tar).hexdigest()  # the stale bytes were forgotten


def test_a_download_that_stops_progressing_gives_up_and_keeps_its_part(
    tmp_path: Path, archive_server: ArchiveServer, spleen_tar: bytes
) -> None:
    archive_server.cuts, archive_server.cut_at = 1000, 0  # every response ends before its first byte
    part = tmp_path / "part.tar"
    part.write_bytes(spleen_tar[:100])
    with pytest.raises(DataError, match="3 times in a row without progress") as caught:
        download(archive_server.url(TAR), part, Digests(), retries=2, backoff=0.0)
    assert "run the same command again to resume" in str(caught.value)
    assert part.read_bytes() == spleen_tar[:100] and len(archive_server.ranges) == 3


def test_a_complete_part_is_recognised_from_a_416(
    tmp_path: Path, archive_server: ArchiveServer, spleen_tar: bytes
) -> None:
    part = tmp_path / "part.tar"
    part.write_bytes(spleen_tar)
    report = download(archive_server.url(TAR), part, Digests(), backoff=0.0)
    assert report.size == len(spleen_tar) and archive_server.ranges == [f"bytes={len(spleen_tar)}-"]


def test_an_out_that_is_a_file_is_one_line(tmp_path: Path, archive_server: ArchiveServer, spleen_tar: bytes) -> None:
    (tmp_path / "data").write_text("not a folder")
    code, output = _fetch(tmp_path, archive_server, sha256=hashlib.sha256(spleen_tar).hexdigest())
    assert code == 1 and "cannot create a folder here" in _error_line(output) and archive_server.ranges == []
