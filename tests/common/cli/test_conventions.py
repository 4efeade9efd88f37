"""One convention for the three CLIs: size options are D,H,W = z,y,x, --device defaults to auto, 80-column output."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import torch
import typer
from typer.testing import CliRunner

from fedseg.client.cli.main import app as client_app
from fedseg.common.cli.main import app as eval_app
from fedseg.common.cli.shell import SIZE_HELP
from fedseg.common.engine.checkpoint import load_checkpoint
from fedseg.common.errors import DataError
from fedseg.server.cli.main import app as server_app

runner = CliRunner()
APPS = {"fed-eval": eval_app, "fed-server": server_app, "fed-client": client_app}
SIZE_DEFAULT = re.compile(r"\d+,\d+,\d+")  # a size option is one whose default is three integers


def options() -> list[tuple[str, click.Option]]:
    """(``program command``, option) for every option of every command of the three CLIs."""
    found = []
    for program, app in APPS.items():
        group = typer.main.get_command(app)
        assert isinstance(group, click.Group)
        for name, command in group.commands.items():
            found += [(f"{program} {name}", p) for p in command.params if isinstance(p, click.Option)]
    return found


def test_every_size_option_says_d_h_w_is_z_y_x() -> None:
    sizes = [(where, opt) for where, opt in options() if SIZE_DEFAULT.fullmatch(str(opt.default))]
    names = {f"{where} {opt.opts[0]}" for where, opt in sizes}
    assert {"fed-eval summary --input", "fed-eval train --patch", "fed-eval phantoms --size"} <= names
    assert "fed-server demo --size" in names
    for where, opt in sizes:
        assert SIZE_HELP in (opt.help or ""), f"{where} {opt.opts[0]}"
        depth, height, width = (int(v) for v in str(opt.default).split(","))
        assert depth <= height == width, f"{where} default {opt.default} is not z,y,x"  # slices first


def test_every_device_option_defaults_to_auto() -> None:
    devices = {where: opt for where, opt in options() if "--device" in opt.opts}
    assert set(devices) == {"fed-eval predict", "fed-eval train", "fed-client join"}
    assert {opt.default for opt in devices.values()} == {"auto"}


@pytest.mark.parametrize(
    "args",
    [
        ["summary", "--input", "32,64,64"],
        ["phantoms", "--sites", "3", "--cases-per-site", "1", "--val-cases", "1", "--size", "16,16,16"],
    ],
)
def test_tables_fit_80_columns_in_plain_output(args: list[str], tmp_path: Path) -> None:
    extra = ["--out", str(tmp_path / "data")] if args[0] == "phantoms" else []
    result = runner.invoke(eval_app, [*args, *extra])
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert "…" not in result.stdout and "\x1b" not in result.stdout


def test_checkpoint_errors_are_whole_sentences(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"model": torch.nn.Linear(1, 1)}, path)  # a pickled module, which fedseg never unpickles
    with pytest.raises(DataError) as caught:
        load_checkpoint(path)
    assert str(caught.value) == (
        f"{path} is not a fedseg checkpoint: it holds Python objects other than tensors and plain data, "
        "which fedseg never loads; pass a .pt written by fed-eval train or fed-server"
    )


def test_checkpoint_error_for_a_non_pytorch_file_is_whole(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_bytes(b"not a checkpoint at all")  # torch's own message here is a 500-character paragraph
    with pytest.raises(DataError) as caught:
        load_checkpoint(path)
    assert str(caught.value) == (
        f"{path} is not a readable fedseg checkpoint (not a PyTorch .pt file, or a damaged one); "
        "pass a .pt written by fed-eval train or fed-server"
    )
