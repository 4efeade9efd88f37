"""LabelManifest: loading (TOML, JSON, built-ins), validation, and the mapping to global classes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from fedseg.common.data.io import read_volume
from fedseg.common.data.manifest import (
    GLOBAL_CLASSES,
    LabelManifest,
    builtin_manifest_names,
    default_manifest,
    label_values,
    load_manifest,
    site_manifest,
)
from fedseg.common.errors import ConfigError, DataError

DATA_DIR = Path(__file__).parents[2] / "data"


def test_real_ct_maps_to_readme_voxel_counts(real_labels_path: Path) -> None:
    manifest = load_manifest(DATA_DIR / "labels.toml")
    label = read_volume(real_labels_path).array
    global_label = manifest.to_global(label)
    assert global_label.dtype == np.uint8 and global_label.shape == label.shape
    counts = np.bincount(global_label.ravel(), minlength=5)
    assert counts[1:].tolist() == [644, 9452, 3947 + 3676, 38634]
    assert counts.sum() == label.size  # stomach, aorta, ribs, ... all became background


def test_real_ct_with_identity_manifest_names_unknown_values(real_labels_path: Path) -> None:
    label = read_volume(real_labels_path).array
    with pytest.raises(DataError, match=r"label values 5, 6, 7, .*more\) are not in the label manifest"):
        default_manifest().to_global(label)


def test_builtin_manifests_load_by_name() -> None:
    assert builtin_manifest_names() == ["msd_pancreas", "phantom", "totalsegmentator"]
    total = load_manifest("totalsegmentator")
    assert total.labels == {1: "spleen", 2: "kidney", 3: "kidney", 5: "liver", 7: "pancreas"}
    assert total.other_labels == "background"
    assert load_manifest("phantom").labels == default_manifest().labels


def test_msd_pancreas_maps_tumour_to_pancreas_and_annotates_only_pancreas() -> None:
    manifest = load_manifest("msd_pancreas")
    label = np.array([[[0, 1, 2]]], dtype=np.uint8)
    np.testing.assert_array_equal(manifest.to_global(label), [[[0, 1, 1]]])
    assert manifest.annotated_mask() == (True, True, False, False, False)
    with pytest.raises(DataError, match="label values 3 "):
        manifest.to_global(np.array([[[3]]], dtype=np.uint8))


def test_identity_default_and_label_zero_is_background() -> None:
    manifest = default_manifest()
    label = np.arange(5, dtype=np.int16).reshape(1, 1, 5)
    np.testing.assert_array_equal(manifest.to_global(label), label)
    assert manifest.annotated == ["pancreas", "spleen", "kidney", "liver"]
    assert manifest.annotated_mask() == (True,) * len(GLOBAL_CLASSES)


def test_other_labels_background_maps_unlisted_values_to_zero() -> None:
    manifest = LabelManifest(labels={7: "pancreas"}, other_labels="background")
    label = np.array([[[7, 8, 250, 0]]], dtype=np.uint8)
    np.testing.assert_array_equal(manifest.to_global(label), [[[1, 0, 0, 0]]])


def test_annotated_defaults_to_mapped_classes_in_global_order() -> None:
    manifest = LabelManifest(labels={1: "liver", 2: "spleen", 3: "background"})
    assert manifest.annotated == ["spleen", "liver"]
    assert manifest.annotated_mask() == (True, False, True, False, True)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.int32, np.int64, np.float32, np.float64])
def test_to_global_accepts_integer_and_whole_float_labels(dtype: type) -> None:
    manifest = LabelManifest(labels={300: "kidney", 2: "liver"}, other_labels="background")
    label = np.array([0, 2, 300, 5], dtype=dtype).reshape(1, 2, 2)
    np.testing.assert_array_equal(manifest.to_global(label).ravel(), [0, 4, 3, 0])


def test_fractional_and_nan_labels_are_data_errors() -> None:
    manifest = default_manifest()
    with pytest.raises(DataError, match=r"non-integer values 0\.5"):
        manifest.to_global(np.array([[[0.0, 0.5, 1.0]]], dtype=np.float32))
    with pytest.raises(DataError, match="NaN"):
        manifest.to_global(np.array([[[0.0, np.nan]]], dtype=np.float32))


def test_negative_label_value_is_unknown() -> None:
    with pytest.raises(DataError, match="label values -1 "):
        default_manifest().to_global(np.array([[[-1, 0, 1]]], dtype=np.int16))


def test_label_values_are_sorted_and_distinct() -> None:
    assert label_values(np.array([[[3, 0, 3, 117]]], dtype=np.uint8)) == [0, 3, 117]
    assert label_values(np.array([[[3, -2, 3]]], dtype=np.int32)) == [-2, 3]


def test_toml_and_json_forms_are_equivalent(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(
        'site = "s1"\nannotated = ["kidney"]\n[labels]\n"2" = "kidney"\n"3" = "kidney"\n"5" = "liver"\n'
    )
    (tmp_path / "m.json").write_text(
        json.dumps({"site": "s1", "annotated": ["kidney"], "labels": {"2": "kidney", "3": "kidney", "5": "liver"}})
    )
    from_toml, from_json = load_manifest(tmp_path / "m.toml"), load_manifest(tmp_path / "m.json")
    assert from_toml == from_json
    assert from_toml.labels == {2: "kidney", 3: "kidney", 5: "liver"}
    assert from_toml.annotated_mask() == (True, False, False, True, False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[labels]\n"1" = "heart"\n', "unknown global class 'heart'"),
        ('annotated = ["liver"]\n[labels]\n"1" = "spleen"\n', "have no label value mapped"),
        ('[labels]\n"1" = "spleen"\ncolour = "red"\n', "labels.colour"),
        ('[labels]\n"1" = "spleen"\n[extra]\nx = 1\n', "extra: Extra inputs are not permitted"),
        ('other_labels = "ignore"\n[labels]\n"1" = "spleen"\n', "other_labels"),
        ('[labels]\n"-3" = "spleen"\n', "negative"),
        ("[labels\n", "invalid TOML"),
    ],
)
def test_invalid_manifest_is_config_error_naming_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "site.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_manifest(path)
    assert str(info.value).startswith(str(path))
    assert expected in str(info.value)


def test_missing_manifest_lists_builtin_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no such label manifest.*totalsegmentator"):
        load_manifest(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="no such label manifest"):
        load_manifest("not-a-builtin")


def test_manifest_is_frozen() -> None:
    with pytest.raises(ValidationError):
        default_manifest().site = "other"  # type: ignore[misc]


def test_site_manifest_prefers_explicit_then_site_file_then_identity(tmp_path: Path) -> None:
    assert site_manifest(tmp_path) == default_manifest()
    (tmp_path / "labels.toml").write_text('site = "own"\n[labels]\n"9" = "liver"\n')
    assert site_manifest(tmp_path).site == "own"
    assert site_manifest(tmp_path, "totalsegmentator").site == "totalsegmentator"
    with pytest.raises(ConfigError, match="no such label manifest"):
        site_manifest(tmp_path, tmp_path / "other.toml")
