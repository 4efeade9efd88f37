"""The registry: the built-in list, --registry files adding and overriding entries, one-line errors, `list`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseg.common.cli.main import app
from fedseg.common.datasets.registry import find_entry, load_registry
from fedseg.common.errors import ConfigError
from tests.common.datasets.conftest import registry_file

runner = CliRunner()
#: The MD5 sums MONAI 1.6 publishes for the Decathlon tars (monai.apps.DecathlonDataset.md5).
MONAI_MD5 = {
    "msd-liver": "a90ec6c4aa7f6a3d087205e23d4e6397",
    "msd-pancreas": "4f7080cfca169fa8066d17ce6eb061e4",
    "msd-spleen": "410d4a301da4e5b2f6f86ec3ddba524e",
}


def test_the_built_in_list_has_msd_kits_and_totalsegmentator_with_their_checksums() -> None:
    registry = load_registry()
    assert {"msd-liver", "msd-pancreas", "msd-spleen", "kits23", "totalsegmentator"} <= set(registry)
    for name, md5 in MONAI_MD5.items():
        assert registry[name].checksum == ("md5", md5)
        assert str(registry[name].url).startswith("https://msd-for-monai.s3-us-west-2.amazonaws.com/Task0")
    assert registry["totalsegmentator"].checksum is None and registry["totalsegmentator"].licence == "CC BY 4.0"
    assert registry["totalsegmentator"].manifest().labels == {1: "spleen", 2: "kidney", 3: "kidney", 5: "liver",
                                                               7: "pancreas"}  # fmt: skip


def test_the_monai_md5_sums_are_the_ones_monai_publishes() -> None:
    monai = pytest.importorskip("monai.apps.datasets")
    published = monai.DecathlonDataset.md5
    tasks = {"msd-liver": "Task03_Liver", "msd-pancreas": "Task07_Pancreas", "msd-spleen": "Task09_Spleen"}
    for name, task in tasks.items():
        assert MONAI_MD5[name] == published[task]
        assert load_registry()[name].url == monai.DecathlonDataset.resource[task]


def test_an_override_keeps_what_it_does_not_name_and_a_new_checksum_replaces_both(tmp_path: Path) -> None:
    mirror = registry_file(tmp_path / "a.toml", "msd-spleen", url="http://intranet.example/Task09_Spleen.tar")
    entry = find_entry(load_registry(mirror), "msd-spleen")
    assert entry.url == "http://intranet.example/Task09_Spleen.tar"
    assert entry.checksum == ("md5", MONAI_MD5["msd-spleen"])
    repacked = registry_file(tmp_path / "b.toml", "msd-spleen", sha256="AB" * 32)
    entry = find_entry(load_registry(repacked), "msd-spleen")
    assert entry.checksum == ("sha256", "ab" * 32) and entry.md5 is None and entry.checksum_source == ""


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"sha256": "123"}, "sha256 must be 64 hexadecimal digits"),
        ({"url": "ftp://x/y.tar"}, "must start with http:// or https://"),
        ({"organs": ["brain"]}, "unknown organs ['brain']"),
        ({"labels": {"1": "lung"}}, "unknown global class 'lung'"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_a_bad_registry_entry_is_one_line_naming_the_file(
    tmp_path: Path, keys: dict[str, object], message: str
) -> None:
    path = registry_file(tmp_path / "bad.toml", "msd-spleen", **keys)
    with pytest.raises(ConfigError, match=r"bad\.toml: datasets\.msd-spleen: ") as caught:
        load_registry(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_registry_file_of_another_shape_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('[msd-spleen]\nurl = "http://x/y.tar"\n')
    with pytest.raises(ConfigError, match=r"holds only \[datasets.NAME\] tables"):
        load_registry(path)
    path.write_text("not = [toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_registry(path)
    with pytest.raises(ConfigError, match="cannot read the registry"):
        load_registry(tmp_path / "missing.toml")


def test_list_shows_every_dataset_in_80_columns_and_json() -> None:
    result = runner.invoke(app, ["datasets", "list"])
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    for text in ("msd-spleen", "CC BY-SA 4.0", "410d4a301da4e5b", "unknown (fetch", "kits23", "CC BY-NC-SA"):
        assert text in result.stdout
    as_json = json.loads(runner.invoke(app, ["datasets", "list", "--json"]).stdout)
    assert as_json["msd-pancreas"]["md5"] == MONAI_MD5["msd-pancreas"] and as_json["kits23"]["url"] is None
