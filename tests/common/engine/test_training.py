"""Training loop (overfitting, determinism, FedProx) and the ``fed-eval train`` command (checkpoints, resume)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedseg.common.cli.main import app
from fedseg.common.data.io import Volume
from fedseg.common.data.manifest import LabelManifest
from fedseg.common.data.preprocess import PreparedCase, PreprocessConfig, preprocess_case
from fedseg.common.engine.checkpoint import load_checkpoint, read_meta
from fedseg.common.engine.config import TrainConfig, lr_factor
from fedseg.common.engine.device import autocast_for, check_device_name, resolve_device
from fedseg.common.engine.train import ProximalTerm, train_model
from fedseg.common.engine.validation import validate
from fedseg.common.errors import ConfigError
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.common.synthetic.phantoms import generate_phantoms

TINY = ModelConfig(feature_scale=16)
PATCH = (32, 32, 32)
runner = CliRunner()


def make_case(seed: int = 0, size: int = 32) -> PreparedCase:
    """A 2 mm (z, y, x) CT with a bright sphere (spleen) and a darker box (liver), prepared as in training."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(-50.0, 15.0, (size, size, size)).astype(np.float32)
    label = np.zeros((size, size, size), np.uint8)
    zz, yy, xx = np.mgrid[:size, :size, :size]
    label[(zz - 16) ** 2 + (yy - 12) ** 2 + (xx - 20) ** 2 <= 36] = 1
    label[8:16, 20:28, 4:12] = 2
    hu[label == 1] += 180.0
    hu[label == 2] += 90.0
    geometry = {"spacing": (2.0, 2.0, 2.0), "origin": (0.0, 0.0, 0.0), "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)}
    manifest = LabelManifest(labels={1: "spleen", 2: "liver"})
    return preprocess_case(Volume(hu, **geometry), Volume(label, **geometry), manifest, PreprocessConfig())


@pytest.fixture(scope="module")
def case() -> PreparedCase:
    return make_case()


def _config(**update: object) -> TrainConfig:
    base = {"steps": 3, "patch_size": PATCH, "batch_size": 2, "lr": 3e-3, "augment": False, "foreground_prob": 0.5}
    return TrainConfig.model_validate({**base, **update})


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(TINY)


def test_prepared_fixture_has_expected_classes(case: PreparedCase) -> None:
    assert case.image.shape == (32, 32, 32)
    assert case.label is not None and set(np.unique(case.label)) == {0, 2, 4}
    assert case.annotated == (True, False, True, False, True)


def test_train_config_total_steps_and_patch_check() -> None:
    assert TrainConfig(epochs=3, steps_per_epoch=5).total_steps == 15
    assert TrainConfig(epochs=3, steps_per_epoch=5, steps=7).total_steps == 7
    cfg = TrainConfig()
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.prox_mu) == (1e-4, 1e-6, 2, 0.0)
    with pytest.raises(ValueError, match="multiple of 16"):
        TrainConfig(patch_size=(32, 30, 32))


def test_train_model_overfits_tiny_case(case: PreparedCase) -> None:
    model = _model()
    before = validate(model, [case], PATCH, "cpu")
    report = train_model(model, [case], _config(steps=40, lr=1e-2), "cpu", val_cases=[case], progress=False)
    assert report.steps == 40 and report.samples == 80 and len(report.loss_history) == 40
    assert np.mean(report.loss_history[-5:]) < 0.6 * np.mean(report.loss_history[:5])
    assert report.dice is not None
    assert report.dice["dice_mean"] > before["dice_mean"] + 0.3
    assert report.dice["dice_spleen"] > 0.6 and report.dice["dice_liver"] > 0.6
    assert np.isnan(report.dice["dice_pancreas"])  # not annotated in this case
    assert report.val_history[-1] == (40, report.dice)
    assert report.seconds > 0 and report.samples_per_second > 0


def test_train_model_same_seed_same_losses(case: PreparedCase) -> None:
    # the patch covers the whole case, so only augmentation depends on the seed; fp32, since oneDNN's bf16
    # kernels do not repeat bit for bit on every CPU (an AMD EPYC with AVX-512 BF16 differed in the 4th decimal)
    cfg = _config(augment=True, cpu_bf16=False)
    first = train_model(_model(), [case], cfg, "cpu", progress=False).loss_history
    second = train_model(_model(), [case], cfg, "cpu", progress=False).loss_history
    seed1 = _config(augment=True, seed=1, cpu_bf16=False)
    other = train_model(_model(), [case], seed1, "cpu", progress=False).loss_history
    assert first == second
    assert first != other


def test_train_model_validates_every_epoch(case: PreparedCase) -> None:
    cfg = _config(steps=None, epochs=2, steps_per_epoch=2, val_every=1)
    report = train_model(_model(), [case], cfg, "cpu", val_cases=[case], progress=False)
    assert [step for step, _ in report.val_history] == [2, 4]


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:1", "auto"])
def test_device_names_accepted(name: str) -> None:
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["gpu", "cudafoo", "cuda:", "cuda:x", "CPU", "mps", ""])
def test_device_names_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="must be cpu, cuda, cuda:N or auto"):
        check_device_name(name)
    with pytest.raises(ConfigError, match=r"validation\.device .* is not a device"):
        resolve_device(name, "validation.device")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cpu_bf16_autocasts_training_on_the_cpu(case: PreparedCase) -> None:
    conv = torch.nn.Conv3d(1, 2, 3)
    x = torch.randn(1, 1, 8, 8, 8)
    with autocast_for(torch.device("cpu"), True):
        assert conv(x).dtype == torch.float32  # amp alone never touches the CPU
    with autocast_for(torch.device("cpu"), True, cpu_bf16=True):
        assert conv(x).dtype == torch.bfloat16
    report = train_model(_model(), [case], _config(steps=3, cpu_bf16=True), "cpu", progress=False)
    assert report.steps == 3 and all(np.isfinite(report.loss_history))


def test_lr_factor_hand_computed() -> None:
    assert [lr_factor(s, 10, "constant") for s in (0, 5, 20)] == [1.0, 1.0, 1.0]
    assert lr_factor(0, 10, "poly") == 1.0
    assert lr_factor(5, 10, "poly") == pytest.approx(0.5**0.9)
    assert lr_factor(10, 10, "poly") == 0.0 and lr_factor(15, 10, "poly") == 0.0
    assert [lr_factor(s, 10, "constant", warmup=4) for s in (0, 1, 3, 8)] == [0.25, 0.5, 1.0, 1.0]
    assert lr_factor(1, 10, "poly", warmup=4) == pytest.approx(0.5 * 0.9**0.9)


class _LrRecorder(torch.optim.SGD):
    """SGD that records the learning rate of every step (what train_model set before stepping)."""

    def __init__(self, params: object) -> None:
        super().__init__(params, lr=1.0)  # type: ignore[arg-type]
        self.seen: list[float] = []

    def step(self, closure: object = None) -> None:  # type: ignore[override]
        self.seen.append(self.param_groups[0]["lr"])


def test_train_model_applies_schedule_across_calls(case: PreparedCase) -> None:
    model = _model()
    opt = _LrRecorder(model.parameters())
    cfg = _config(steps=2, lr=1.0, lr_schedule="poly")
    train_model(model, [case], cfg, "cpu", progress=False, optimizer=opt, schedule=(0, 4))
    train_model(model, [case], cfg, "cpu", progress=False, optimizer=opt, schedule=(2, 4))
    assert opt.seen == pytest.approx([1.0, 0.75**0.9, 0.5**0.9, 0.25**0.9])
    constant = _LrRecorder(model.parameters())
    train_model(model, [case], _config(steps=2, lr=0.5), "cpu", progress=False, optimizer=constant)
    assert constant.seen == [0.5, 0.5]


def _distance(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> float:
    return sum(float((p.detach() - reference[n]).pow(2).sum()) for n, p in model.named_parameters()) ** 0.5


def test_fedprox_keeps_weights_closer_to_reference(case: PreparedCase) -> None:
    reference = {n: p.detach().clone() for n, p in _model().named_parameters()}
    plain, prox = _model(), _model()
    train_model(plain, [case], _config(steps=4), "cpu", progress=False)
    train_model(prox, [case], _config(steps=4, prox_mu=50.0), "cpu", reference_weights=reference, progress=False)
    assert _distance(prox, reference) < 0.7 * _distance(plain, reference)


def test_proximal_term_hand_computed() -> None:
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0]]))
    term = ProximalTerm(layer, mu=0.5, reference={"weight": torch.zeros(1, 2)})
    assert float(term().detach()) == pytest.approx(0.25 * 5.0)
    assert float(ProximalTerm(layer, mu=0.5)().detach()) == 0.0  # default reference = current weights
    with pytest.raises(ValueError, match="'weight'"):
        ProximalTerm(layer, mu=0.5, reference={"weight": torch.zeros(2, 2)})


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantoms") / "data"
    generate_phantoms(root, sites=1, cases_per_site=2, val_cases=1, size=(32, 32, 32), seed=0)
    return root


def _train_args(root: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(root / "site-1"),
        "--val",
        str(root / "validation"),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--steps-per-epoch",
        "2",
        "--patch",
        "16,32,32",
        "--feature-scale",
        "16",
        "--device",
        "cpu",
        *extra,
    ]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_train_cli_writes_checkpoints_and_resumes(phantom_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = ("--ce-weight", "1", "--affine-prob", "0.3", "--batch-dice", "--cpu-bf16")
    result = runner.invoke(app, _train_args(phantom_root, out, 1, *recipe))
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"last.pt", "best.pt", "metrics.csv"}
    assert read_meta(out / "last.pt").epoch == 1
    result = runner.invoke(app, _train_args(phantom_root, out, 2, "--resume", "--lr-schedule", "poly"))
    assert result.exit_code == 0, result.output
    rows = _rows(out / "metrics.csv")
    assert [int(float(r["epoch"])) for r in rows] == [1, 2]
    assert {"loss", "dice_liver", "dice_mean", "samples_per_second"} <= set(rows[0])
    _, meta = load_checkpoint(out / "last.pt", expect=ModelConfig(feature_scale=16))
    assert meta.epoch == 2 and meta.patch_size == (16, 32, 32)
    optimizer = torch.load(out / "last.pt", weights_only=True)["optimizer"]
    assert float(next(iter(optimizer["state"].values()))["step"]) == 4.0  # Adam state continued across the resume
    assert optimizer["param_groups"][0]["lr"] == pytest.approx(1e-4 * 0.25**0.9)  # poly at step 4 of 2 x 2
    code, output = _error([*_train_args(phantom_root, out, 3, "--resume"), "--feature-scale", "8"])
    assert code == 1 and "was trained with other model.feature_scale" in output


def _error(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, args)
    return result.exit_code, " ".join(result.output.split())


def test_train_cli_errors(phantom_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, output = _error(_train_args(phantom_root, out, 1, "--resume"))
    assert code == 1 and "--resume:" in output and "does not exist" in output
    code, output = _error(_train_args(phantom_root, out, 1, "--patch", "16,30,32"))
    assert code == 1 and "multiple of 16" in output
    code, output = _error(_train_args(phantom_root, out, 1, "--affine-prob", "1.5"))
    assert code == 1 and "affine_prob" in output and "less than or equal to 1" in output
    code, output = _error(_train_args(phantom_root, out, 1, "--patch", "abc"))
    assert code == 1 and "--patch must be three integers" in output
    code, output = _error(["train", "--data", str(tmp_path / "nowhere"), "--out", str(out)])
    assert code == 1 and "no such dataset folder" in output
    out.mkdir(parents=True, exist_ok=True)
    (out / "last.pt").write_bytes(b"x")
    code, output = _error(_train_args(phantom_root, out, 1))
    assert code == 1 and "already holds a training run" in output
