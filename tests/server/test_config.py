"""Server config: TOML + overrides, one-line error messages, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseg.common.errors import ConfigError
from fedseg.server.config import RunSpec, ServerConfig
from fedseg.server.configfile import load_server_config, merge, parse_overrides


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_on_loopback() -> None:
    cfg = load_server_config(None)
    assert cfg.rounds == 10
    assert cfg.strategy.name == "fedavg"
    assert cfg.loopback
    assert cfg.address == "127.0.0.1:9092"
    assert cfg.output_dir.is_absolute()


def test_file_values_and_overrides_are_merged(tmp_path: Path) -> None:
    path = _write(tmp_path, 'rounds = 3\noutput_dir = "out"\n[strategy]\nname = "fedprox"\nproximal_mu = 0.1\n')
    cfg = load_server_config(path, ["rounds=7", "train.patch_size=[32, 32, 32]", "strategy.proximal_mu=0.5"])
    assert cfg.rounds == 7
    assert cfg.strategy.name == "fedprox"
    assert cfg.strategy.proximal_mu == 0.5
    assert cfg.train.patch_size == (32, 32, 32)
    assert cfg.output_dir == (tmp_path / "out").resolve()
    assert cfg.validation_patch == (32, 32, 32)


def test_relative_validation_path_is_resolved_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "central").mkdir()
    cfg = load_server_config(_write(tmp_path, '[validation]\ndata = "central"\n'))
    assert cfg.validation.data == (tmp_path / "central").resolve()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[strategy]\nnmae = 'fedavg'\n", "server.toml: strategy.nmae: Extra inputs are not permitted"),
        (
            "[strategy]\nname = 'fedsgd'\n",
            "server.toml: strategy.name: Input should be 'fedavg', 'fedprox', 'fedadam', 'fedyogi', 'median', "
            "'trimmed-mean', 'krum', 'multi-krum' or 'bulyan'",
        ),
        ("rounds = 0\n", "server.toml: rounds: Input should be greater than or equal to 1"),
        ("fraction = 1.5\n", "server.toml: fraction: Input should be less than or equal to 1"),
        ("min_sites = 2\nmin_replies = 3\n", "min_replies (3) cannot exceed min_sites (2)"),
        ("[train]\npatch_size = [30, 32, 32]\n", "train.patch_size: Value error, every side must be a positive"),
        (
            "[validation]\ndevice = 'tpu'\n",
            "validation.device: Value error, must be cpu, cuda, cuda:N or auto, got 'tpu'",
        ),
        ("[validation]\ndata = 'nowhere'\n", "server.toml: validation.data = "),
        (
            "[preprocess]\nnormalization = 'per-site'\n",
            "server.toml: preprocess.normalization: Input should be 'volume', 'body' or 'site'",
        ),
        ("[tls]\nca = 'ca.crt'\n", "tls.cert: Field required"),
        ("supernode_auth = true\n", "supernode_auth needs a [tls] table"),
    ],
)
def test_invalid_values_give_one_line_naming_the_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_server_config(_write(tmp_path, text))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*missing\.toml does not exist"):
        load_server_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"server.toml is not valid TOML"):
        load_server_config(_write(tmp_path, "rounds = = 3\n"))


def test_unknown_manifest_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such label manifest"):
        load_server_config(_write(tmp_path, "[validation]\nlabels = 'nonexistent_manifest'\n"))


def test_parse_overrides_reads_toml_values_and_plain_strings() -> None:
    parsed = parse_overrides(["rounds=5", "strategy.name=fedprox", "train.lr=1e-3", 'host="0.0.0.0"', "x.y.z=true"])
    assert parsed == {
        "rounds": 5,
        "strategy": {"name": "fedprox"},
        "train": {"lr": 1e-3},
        "host": "0.0.0.0",
        "x": {"y": {"z": True}},
    }


@pytest.mark.parametrize("item", ["rounds", "=5", "train..lr=1"])
def test_parse_overrides_rejects_malformed_items(item: str) -> None:
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_overrides([item])


def test_override_of_a_value_by_a_table_conflicts() -> None:
    with pytest.raises(ConfigError, match="conflicts"):
        parse_overrides(["train=1", "train.lr=2"])


def test_merge_is_recursive_and_does_not_modify_the_base() -> None:
    base = {"a": 1, "t": {"x": 1, "y": 2}}
    assert merge(base, {"t": {"y": 3}}) == {"a": 1, "t": {"x": 1, "y": 3}}
    assert base == {"a": 1, "t": {"x": 1, "y": 2}}


def test_address_of_ipv6_and_remote_hosts() -> None:
    assert ServerConfig(host="::1", port=1234).address == "[::1]:1234"
    assert ServerConfig(host="::1").loopback
    assert not ServerConfig(host="0.0.0.0").loopback
    assert not ServerConfig(host="fed.example.org").loopback


def test_run_spec_counts_remaining_rounds() -> None:
    assert RunSpec(config=ServerConfig(rounds=10), first_round=4).num_rounds == 7
    assert RunSpec.model_validate_json(RunSpec(config=ServerConfig()).model_dump_json()).num_rounds == 10
