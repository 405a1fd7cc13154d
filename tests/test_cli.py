"""The CLI end to end on tiny generated image folders: JSON fields, files written, exit codes, help."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import TINY_BACKBONE, run_cli, write_image_folder
from safetensors.numpy import load_file

TINY = ["--backbone", TINY_BACKBONE, "--no-pretrained", "--image-size", "64"]


@pytest.fixture
def trained(split_folder, tmp_path):
    """A model repurposed from split_folder/train (its test/ is left for evaluate)."""
    model = tmp_path / "runs" / "tiny"
    result = run_cli("repurpose", split_folder, "-o", model, *TINY, "--json")
    return model, json.loads(result.stdout)


def test_repurpose_writes_a_safe_model_folder(trained):
    model, summary = trained
    assert summary["classes"] == ["blue", "green", "red"] and summary["head"] == "lr"
    assert summary["validation_metrics"]["accuracy"] >= 0.9  # colours: trivially separable
    assert summary["info"]["n_train"] + summary["info"]["n_val"] == 30
    assert sorted(p.name for p in model.iterdir()) == ["head.json", "head.safetensors", "model.json",
                                                       "ood.safetensors"]
    manifest = json.loads((model / "model.json").read_text())
    assert manifest["format_version"] == 2 and manifest["kind"] == "features"
    assert manifest["backbone"]["name"] == TINY_BACKBONE
    assert manifest["backbone"]["preprocess"]["input_size"] == [64, 64]
    assert len(manifest["backbone"]["weights_digest"]) == 64
    assert manifest["head"]["name"] == "lr" and "C" in manifest["head"]["params"]
    calibration = manifest["calibration"]
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-9 and calibration["temperature"] > 0
    assert not list(model.parent.glob(".*tmp*"))  # no temporary folder left behind


def test_existing_output_needs_force_and_force_replaces_only_a_model(trained, split_folder, tmp_path):
    model, _ = trained
    result = run_cli("repurpose", split_folder, "-o", model, *TINY, code=2)
    assert "already exists" in result.stderr and "--force" in result.stderr
    run_cli("repurpose", split_folder, "-o", model, *TINY, "--force", "--json")
    precious = write_image_folder(tmp_path / "precious", per_class=2)
    refused = run_cli("repurpose", split_folder, "-o", precious, *TINY, "--force", code=2)
    assert "not a folder xferkit wrote" in refused.stderr
    assert len(list(precious.rglob("*.png"))) == 6  # nothing deleted


def test_head_options_come_from_one_mechanism(split_folder, tmp_path):
    summary = json.loads(run_cli("repurpose", split_folder, "-o", tmp_path / "m", *TINY, "--set", "C=0.5",
                                 "--json").stdout)
    assert summary["head_params"]["C"] == 0.5
    alias = json.loads(run_cli("repurpose", split_folder, "-o", tmp_path / "a", *TINY, "--C", "0.25",
                               "--json").stdout)
    assert alias["head_params"]["C"] == 0.25
    for bad, message in [("lr.nope=1", "has no parameter 'nope'"), ("gp.epochs=3", "runs the lr head"),
                         ("C=many", "not a valid")]:
        assert message in run_cli("repurpose", split_folder, *TINY, "--set", bad, code=2).stderr


def test_evaluate_reports_metrics_and_plots(trained, split_folder, tmp_path):
    model, _ = trained
    report = json.loads(run_cli("evaluate", model, split_folder / "test", "--json",
                                "--plots", tmp_path / "plots").stdout)
    assert report["metrics"]["accuracy"] >= 0.9 and report["metrics"]["nll"] < 0.5
    assert report["metrics"]["n"] == 15
    assert sum(map(sum, report["confusion_matrix"])) == 15
    assert [row["class"] for row in report["per_class"]] == ["blue", "green", "red"]
    for png in ("confusion_matrix.png", "reliability.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:4] == b"\x89PNG"


def test_evaluate_defaults_to_the_data_test_folder(trained):
    model, _ = trained
    table = run_cli("evaluate", model).stdout
    assert "accuracy" in table and "confusion matrix" in table


def test_evaluate_accuracy_gate(trained, split_folder):
    model, _ = trained
    run_cli("evaluate", model, split_folder / "test", "--min-accuracy", "1.0", code=0)
    run_cli("evaluate", model, split_folder / "test", "--min-accuracy", "1.01", code=2)  # out of range


def test_predict_labels_images_and_skips_bad_ones(trained, split_folder, tmp_path):
    model, _ = trained
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    out = json.loads(run_cli("predict", model, split_folder / "test" / "red", tmp_path / "broken.jpg",
                             "--json", "--top-k", "2", "--csv", tmp_path / "p.csv").stdout)
    assert len(out["predictions"]) == 5 and len(out["skipped"]) == 1
    assert {p["label"] for p in out["predictions"]} == {"red"}
    first = out["predictions"][0]
    assert len(first["top_k"]) == 2 and first["top_k"][0]["probability"] >= first["top_k"][1]["probability"]
    assert first["uncertainty"]["entropy"] >= 0.0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 6


def test_extract_writes_features_and_keeps_an_existing_file(image_folder, tmp_path):
    summary = json.loads(run_cli("extract", image_folder, "-o", tmp_path / "f.safetensors", *TINY,
                                 "--json").stdout)
    tensors = load_file(tmp_path / "f.safetensors")
    assert tensors["features"].shape == (30, summary["dim"]) and tensors["labels"].shape == (30,)
    before = (tmp_path / "f.safetensors").read_bytes()
    assert "already exists" in run_cli("extract", image_folder, "-o", tmp_path / "f.safetensors", *TINY,
                                       code=2).stderr
    assert (tmp_path / "f.safetensors").read_bytes() == before


def test_backbones_lists_names_and_layers():
    assert "resnet18" in run_cli("backbones", "resnet1").stdout.split()
    names = json.loads(run_cli("backbones", "resnet18", "--json").stdout)
    assert "tv:resnet18" in names and "resnet18" in names
    assert "layer2" in run_cli("backbones", TINY_BACKBONE, "--layers").stdout.split()


def _one_class(tmp_path):
    root = write_image_folder(tmp_path / "one", per_class=3)
    for name in ("green", "blue"):
        for f in (root / name).iterdir():
            f.unlink()
        (root / name).rmdir()
    return root


@pytest.mark.parametrize("case, message", [
    ("unknown_backbone", "unknown backbone"),
    ("missing_path", "does not exist"),
    ("one_class", "only one class"),
    ("offline", "no pretrained weights"),
    ("cuda", "no CUDA GPU"),
    ("bad_option", "does not take --epochs"),
])
def test_bad_input_is_one_clear_line_and_exit_2(image_folder, tmp_path, case, message):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    args = {
        "unknown_backbone": ["repurpose", image_folder, "--backbone", "resnet_99", "--no-pretrained"],
        "missing_path": ["repurpose", tmp_path / "nowhere", *TINY],
        "one_class": ["repurpose", _one_class(tmp_path) if case == "one_class" else "", *TINY],
        "offline": ["repurpose", image_folder, "--backbone", TINY_BACKBONE],
        "cuda": ["repurpose", image_folder, *TINY, "--device", "cuda"],
        "bad_option": ["repurpose", image_folder, *TINY, "--epochs", "3"],
    }[case]
    result = run_cli(*args, "-o", tmp_path / "out", code=2)
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) <= 3  # one wrapped line, not a report
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_classes_the_model_never_saw(trained, tmp_path):
    model, _ = trained
    other = write_image_folder(tmp_path / "other", per_class=2)
    (other / "red").rename(other / "purple")
    result = run_cli("evaluate", model, other, code=2)
    assert "purple" in result.stderr and "not known to the model" in result.stderr


def test_markup_in_class_names_is_printed_not_interpreted(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=6)
    (data / "red").rename(data / "[bold]red")
    run_cli("repurpose", data, "-o", tmp_path / "m", *TINY)
    table = run_cli("evaluate", tmp_path / "m", data).stdout
    assert "[bold]red" in table


def test_help_imports_neither_torch_nor_scikit_learn():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom xferkit.cli import app\n"
            "for args in ([], ['repurpose'], ['compare'], ['tune'], ['evaluate'], ['backbones']):\n"
            "    assert CliRunner().invoke(app, [*args, '--help']).exit_code == 0, args\n"
            "heavy = [m for m in ('torch', 'sklearn', 'timm', 'gpytorch') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_lists_head_parameters_with_defaults():
    text = run_cli("repurpose", "--help").stdout
    for expected in ("HEAD.PARAM=VALUE", "unfreeze='all'", "--learning-rate", "--gp-method", "[default:"):
        assert expected in text, expected
    assert "<bool>" not in text
