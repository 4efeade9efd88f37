"""Unsafe archives are refused with one line naming the member, through the CLI and nothing is left behind."""

from __future__ import annotations

import hashlib
import io
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

import pytest
from typer.testing import CliRunner

from fedseg.common.cli.main import app
from fedseg.common.datasets.extract import extract
from fedseg.common.errors import DataError
from tests.common.datasets.conftest import ArchiveServer, registry_file, tar_folder, write_msd_task

runner = CliRunner()


def _tar_with(archive: Path, source: Path, extra: tarfile.TarInfo, data: bytes = b"", mode: str = "w") -> bytes:
    """The MSD test task plus one crafted member."""
    with tarfile.open(archive, mode) as tar:
        for path in sorted(source.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(source)), recursive=False)
        tar.addfile(extra, io.BytesIO(data) if data else None)
    return archive.read_bytes()


def _member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


def _fetch_served(tmp_path: Path, server: ArchiveServer, body: bytes, *extra: str) -> tuple[int, str]:
    server.files["/Task09_Spleen.tar"] = body
    sha = hashlib.sha256(body).hexdigest()
    registry = registry_file(tmp_path / "mirror.toml", "msd-spleen", url=server.url("/Task09_Spleen.tar"), sha256=sha)
    out = tmp_path / "data"
    out.mkdir()
    result = runner.invoke(app, ["datasets", "fetch", "msd-spleen", "--out", str(out), "--registry", str(registry),
                                 *extra])  # fmt: skip
    assert list(out.iterdir()) == []  # nothing half-unpacked, no working folder, no download
    assert result.output.splitlines()[-1].startswith("error: ") and "Traceback" not in result.output
    return result.exit_code, result.output.splitlines()[-1]


@pytest.fixture
def task(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    write_msd_task(source, cases=2)
    return source


def test_a_dotdot_member_is_refused(tmp_path: Path, archive_server: ArchiveServer, task: Path) -> None:
    body = _tar_with(tmp_path / "a.tar", task, _member("Task09_Spleen/../../evil.txt", size=4), b"evil")
    code, line = _fetch_served(tmp_path, archive_server, body)
    assert code == 1 and "'Task09_Spleen/../../evil.txt' would be written outside the target folder" in line
    assert not list(tmp_path.rglob("evil.txt"))


def test_a_symlink_leaving_the_folder_is_refused(tmp_path: Path, archive_server: ArchiveServer, task: Path) -> None:
    link = _member("Task09_Spleen/imagesTr/escape", tarfile.SYMTYPE, link="../../../../etc")
    code, line = _fetch_served(tmp_path, archive_server, _tar_with(tmp_path / "a.tar", task, link))
    assert code == 1 and "'Task09_Spleen/imagesTr/escape' is a link pointing outside the target folder" in line


def test_a_hard_link_to_an_outside_file_is_refused(tmp_path: Path, archive_server: ArchiveServer, task: Path) -> None:
    link = _member("Task09_Spleen/passwd", tarfile.LNKTYPE, link="/etc/passwd")
    code, line = _fetch_served(tmp_path, archive_server, _tar_with(tmp_path / "a.tar", task, link))
    assert code == 1 and "'Task09_Spleen/passwd'" in line and "refused" in line


def test_the_uncompressed_size_limit_holds_for_a_compressed_bomb(
    tmp_path: Path, archive_server: ArchiveServer, task: Path
) -> None:
    zeros = bytes(3 << 20)  # 3 MiB of zeros: a few kB once gzipped
    bomb = _tar_with(tmp_path / "a.tar.gz", task, _member("Task09_Spleen/zeros.bin", size=len(zeros)), zeros, "w:gz")
    assert len(bomb) < 64 << 10
    code, line = _fetch_served(tmp_path, archive_server, bomb, "--max-extract-gib", "0.002")  # 2 MiB
    assert code == 1 and "unpacks to more than the 2,147,483-byte limit (at member Task09_Spleen/zeros.bin)" in line


def test_a_safe_tar_within_the_limit_unpacks(tmp_path: Path, task: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    tar_folder(task, archive, "w:gz")
    report = extract(archive, tmp_path / "out", 10 << 20, lambda path: True)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert (tmp_path / "out" / "Task09_Spleen" / "dataset.json").is_file()
    assert report.files == len(files) == 7  # 2 images, 2 labels, the test image, the ._ file, dataset.json
    assert report.size == sum(p.stat().st_size for p in files)


def _zip(archive: Path, name: str, data: bytes = b"x", mode: int | None = None) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        zf.writestr(info, data)
    return archive


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil", "a/../../evil.txt", "C:/evil.txt", "a\\..\\evil"])
def test_zip_members_leaving_the_folder_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match="would be written outside the target folder"):
        extract(_zip(tmp_path / "a.zip", name), tmp_path / "out", 1 << 20, lambda path: True)
    assert not (tmp_path / "evil.txt").exists()


def test_a_zip_symlink_is_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", "s0000/ct.nii.gz", b"/etc/passwd", stat.S_IFLNK | 0o777)
    with pytest.raises(DataError, match=r"'s0000/ct\.nii\.gz' is a link or special file"):
        extract(archive, tmp_path / "out", 1 << 20, lambda path: True)


def test_a_zip_over_the_limit_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("small.txt", b"ok")
        zf.writestr("zeros.bin", bytes(2 << 20))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match="unpacks to more than the 1,048,576-byte limit"):
        extract(archive, out, 1 << 20, lambda path: True)
    assert list(out.iterdir()) == []


def test_members_the_layout_does_not_want_are_skipped(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("keep/a.txt", b"a")
        zf.writestr("skip/b.txt", b"b")
    extract(archive, tmp_path / "out", 1 << 20, lambda path: path.parts[0] == "keep")
    assert [p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*.txt")] == [PurePosixPath("keep/a.txt")]


def test_a_file_that_is_no_archive_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "page.html").write_text("<html>a login page, not the archive</html>")
    with pytest.raises(DataError, match="neither a tar nor a zip archive"):
        extract(tmp_path / "page.html", tmp_path / "out", 1 << 20, lambda path: True)
