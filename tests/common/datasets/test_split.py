"""`fed-eval datasets split` on datasets fetched from the local server: sites `fed-client check` accepts, by-organ
partial labels, by-source institutions, determinism, links, and one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedseg.client.cli.main import app as client_app
from fedseg.common.cli.main import app
from fedseg.common.data.io import read_volume
from fedseg.common.data.layouts import discover_cases
from fedseg.common.data.manifest import load_manifest
from fedseg.common.datasets.fetch import fetch_dataset
from fedseg.common.datasets.registry import find_entry, load_registry
from tests.common.datasets.conftest import (
    ArchiveServer,
    registry_file,
    tar_folder,
    write_msd_task,
    write_totalseg_release,
    zip_folder,
)

runner = CliRunner()
INSTITUTES = {"A": 4, "B": 3, "C": 2, "D": 1}
ORGAN_VALUES = {"spleen": {1}, "kidney": {2, 3}, "liver": {5}, "pancreas": {7}}


@pytest.fixture
def data(tmp_path: Path, archive_server: ArchiveServer) -> Path:
    """``data/msd-spleen`` (8 cases) and ``data/totalsegmentator`` (10 cases, 4 institutes), fetched from the
    local server through mirror registry files; returns ``data``."""
    spleen = tar_folder(write_msd_task(tmp_path / "msd", cases=8).parent, tmp_path / "Task09_Spleen.tar")
    totalseg = zip_folder(write_totalseg_release(tmp_path / "ts", INSTITUTES), tmp_path / "ts.zip")
    archive_server.files |= {"/Task09_Spleen.tar": spleen, "/ts.zip": totalseg}
    for name, path, body in (("msd-spleen", "/Task09_Spleen.tar", spleen), ("totalsegmentator", "/ts.zip", totalseg)):
        mirror = registry_file(tmp_path / f"{name}.toml", name, url=archive_server.url(path),
                               sha256=hashlib.sha256(body).hexdigest())  # fmt: skip
        fetch_dataset(find_entry(load_registry(mirror), name), tmp_path / "data")
    return tmp_path / "data"


def _split(data: Path, name: str, out: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["datasets", "split", name, "--data", str(data), "--out", str(out), *args])
    return result.exit_code, result.output


def _checked(folder: Path) -> str:
    result = runner.invoke(client_app, ["check", str(folder)])
    assert result.exit_code == 0, result.output
    return result.output


def test_the_totalsegmentator_release_is_arranged_with_combined_labels(data: Path) -> None:
    dataset = data / "totalsegmentator"
    cases = discover_cases(dataset)
    assert [c.case_id for c in cases] == [f"s{i:04d}" for i in range(10)]
    values = np.unique(read_volume(cases[0].label).array)  # type: ignore[arg-type]
    assert values.tolist() == [0, 1, 2, 3, 5, 7]  # stomach (6) was never unpacked, the four organs combined
    assert (dataset / "meta.csv").is_file() and not list(dataset.rglob("segmentations"))
    assert "10 of 10 cases usable" in _checked(dataset)


def test_an_iid_split_gives_sites_fed_client_check_accepts_with_linked_images(data: Path, tmp_path: Path) -> None:
    code, output = _split(data, "msd-spleen", tmp_path / "sites", "--sites", "3")
    assert code == 0, output
    sites = tmp_path / "sites"
    assert sorted(p.name for p in sites.iterdir()) == ["site-1", "site-2", "site-3", "split.json", "validation"]
    counts = [len(discover_cases(sites / f"site-{k}")) for k in (1, 2, 3)]
    assert sorted(counts) == [2, 2, 2] and len(discover_cases(sites / "validation")) == 2  # ceil(0.2 x 8) held out
    for folder in ("site-1", "site-2", "site-3", "validation"):
        assert "cases usable" in _checked(sites / folder)
        assert load_manifest(sites / folder / "labels.toml").annotated == ["spleen"]
    case = discover_cases(sites / "site-1")[0]
    assert os.path.samefile(case.image, data / "msd-spleen" / "imagesTr" / case.image.name)  # a hard link
    record = json.loads((sites / "split.json").read_text())
    assert record["placed"] == {"images hard link": 8, "labels hard link": 8} and "files: images hard link 8" in output
    assert not list(tmp_path.glob(".sites.split"))


def test_the_same_seed_writes_the_same_split_and_the_validation_set_does_not_move(data: Path, tmp_path: Path) -> None:
    plans = {}
    for out, args in {
        "a": ("--sites", "4", "--seed", "3"),
        "b": ("--sites", "4", "--seed", "3"),
        "c": ("--sites", "4", "--seed", "4"),
        "d": ("--sites", "2", "--seed", "3"),
        "e": ("--sites", "4", "--seed", "3", "--scheme", "by-organ"),
    }.items():
        code, output = _split(data, "totalsegmentator", tmp_path / out, *args)
        assert code == 0, output
        plans[out] = json.loads((tmp_path / out / "split.json").read_text())
    assert plans["a"]["sites"] == plans["b"]["sites"] and plans["a"]["sites"] != plans["c"]["sites"]
    assert plans["a"]["validation"] == plans["d"]["validation"] == plans["e"]["validation"]
    assert plans["a"]["validation"] != plans["c"]["validation"]


def test_by_organ_sites_annotate_one_organ_each_and_keep_no_other_label(data: Path, tmp_path: Path) -> None:
    code, output = _split(data, "totalsegmentator", tmp_path / "sites", "--sites", "4", "--scheme", "by-organ")
    assert code == 0, output
    seen = []
    for k in range(1, 5):
        site = tmp_path / "sites" / f"site-{k}"
        manifest = load_manifest(site / "labels.toml")
        (organ,) = manifest.annotated
        seen.append(organ)
        assert set(manifest.labels.values()) == {organ}
        for case in discover_cases(site):
            assert set(np.unique(read_volume(case.label).array).tolist()) == {0} | ORGAN_VALUES[organ]  # type: ignore[arg-type]
        assert "– = class not annotated at this site" in _checked(site)
    assert seen == ["pancreas", "spleen", "kidney", "liver"]
    validation = load_manifest(tmp_path / "sites" / "validation" / "labels.toml")
    assert validation.annotated == ["pancreas", "spleen", "kidney", "liver"]
    record = json.loads((tmp_path / "sites" / "split.json").read_text())
    assert record["placed"]["labels rewritten"] == 8 and record["placed"]["labels hard link"] == 2


def test_by_source_keeps_each_institution_at_one_site(data: Path, tmp_path: Path) -> None:
    code, output = _split(data, "totalsegmentator", tmp_path / "sites", "--sites", "2", "--scheme", "by-source")
    assert code == 0, output
    rows = (data / "totalsegmentator" / "meta.csv").read_text(encoding="utf-8-sig").splitlines()[1:]
    institute = {row.split(";")[0]: row.split(";")[3] for row in rows}
    record = json.loads((tmp_path / "sites" / "split.json").read_text())
    owners: dict[str, str] = {}
    for site in record["sites"]:
        for case in site["cases"]:
            assert institute[case] in site["institutions"]
            assert owners.setdefault(institute[case], site["name"]) == site["name"]
    assert sorted(owners) == sorted({institute[c] for s in record["sites"] for c in s["cases"]})
    assert "cases usable" in _checked(tmp_path / "sites" / "site-1")


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("msd-spleen", ("--scheme", "by-source"), "msd-spleen has none (TotalSegmentator's meta.csv does)"),
        ("msd-spleen", ("--scheme", "by-organ"), "by-organ needs a dataset with several organs"),
        ("totalsegmentator", ("--scheme", "by-organ", "--sites", "3"), "--sites must be at least 4, got 3"),
        ("totalsegmentator", ("--scheme", "by-source", "--sites", "5"), "fewer than --sites 5"),
        ("msd-spleen", ("--sites", "7"), "2 held out for validation leave 6, fewer than --sites 7"),
        ("msd-spleen", ("--val-fraction", "1.5"), "--val-fraction must be at least 0 and below 1, got 1.5"),
        ("msd-liver", (), "no fetched msd-liver here"),
        ("no-such", (), "unknown dataset 'no-such'; known: kits23, msd-liver"),
    ],
)
def test_bad_splits_are_one_line_errors(
    data: Path, tmp_path: Path, name: str, args: tuple[str, ...], message: str
) -> None:
    code, output = _split(data, name, tmp_path / "sites", *args)
    lines = output.splitlines()
    assert code == 1 and lines[-1].startswith("error: ") and message in lines[-1], output
    assert not (tmp_path / "sites").exists() and not list(tmp_path.glob(".sites.split"))


def test_a_split_never_writes_into_a_folder_that_is_not_empty(data: Path, tmp_path: Path) -> None:
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "keep.txt").write_text("mine")
    code, output = _split(data, "msd-spleen", tmp_path / "sites")
    assert code == 1 and "output folder is not empty" in output.splitlines()[-1]
    assert [p.name for p in (tmp_path / "sites").iterdir()] == ["keep.txt"]
