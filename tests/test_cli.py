"""The CLI end to end on a tiny generated image folder: JSON fields, files written, exit codes."""

import json

import pytest
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
    assert 0.0 <= summary["validation_metrics"]["accuracy"] <= 1.0
    assert summary["info"]["n_train"] + summary["info"]["n_val"] == 30
    assert sorted(p.name for p in model.iterdir()) == ["head.json", "head.safetensors", "model.json"]
    manifest = json.loads((model / "model.json").read_text())
    assert manifest["backbone"]["name"] == TINY_BACKBONE
    assert manifest["backbone"]["preprocess"]["input_size"] == [64, 64]
    assert len(manifest["backbone"]["weights_digest"]) == 64
    assert manifest["head"]["name"] == "lr" and "C" in manifest["head"]["params"]
    assert not list(model.parent.glob(".*tmp*"))  # no temporary folder left behind


def test_existing_output_needs_force(trained, split_folder):
    model, _ = trained
    result = run_cli("repurpose", split_folder, "-o", model, *TINY, code=2)
    assert "already exists" in result.stderr and "--force" in result.stderr
    run_cli("repurpose", split_folder, "-o", model, *TINY, "--force", "--json")


def test_evaluate_reports_metrics_and_plots(trained, split_folder, tmp_path):
    model, _ = trained
    report = json.loads(run_cli("evaluate", model, split_folder / "test", "--json",
                            "--plots", tmp_path / "plots").stdout)
    for key in ("accuracy", "macro_f1", "nll", "ece", "brier", "top2_accuracy"):
        assert 0.0 <= report["metrics"][key] <= (1.0 if key != "nll" else 50.0)
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
    run_cli("evaluate", model, split_folder / "test", "--min-accuracy", "1.01", code=1)


def test_predict_labels_images_and_skips_bad_ones(trained, split_folder, tmp_path):
    model, _ = trained
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    out = json.loads(run_cli("predict", model, split_folder / "test" / "red", tmp_path / "broken.jpg",
                         "--json", "--top-k", "2", "--csv", tmp_path / "p.csv").stdout)
    assert len(out["predictions"]) == 5 and len(out["skipped"]) == 1
    first = out["predictions"][0]
    assert first["label"] in {"blue", "green", "red"} and len(first["top_k"]) == 2
    assert first["top_k"][0]["probability"] >= first["top_k"][1]["probability"]
    assert first["uncertainty"]["entropy"] >= 0.0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 6


def test_extract_writes_features(image_folder, tmp_path):
    summary = json.loads(run_cli("extract", image_folder, "-o", tmp_path / "f.safetensors", *TINY,
                             "--json").stdout)
    tensors = load_file(tmp_path / "f.safetensors")
    assert tensors["features"].shape == (30, summary["dim"]) and tensors["labels"].shape == (30,)


def test_backbones_lists_names_and_layers():
    assert "resnet18" in run_cli("backbones", "resnet1").stdout.split()
    assert "tv:resnet18" in json.loads(run_cli("backbones", "resnet18", "--json").stdout)
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
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_classes_the_model_never_saw(trained, tmp_path):
    model, _ = trained
    other = write_image_folder(tmp_path / "other", per_class=2)
    (other / "red").rename(other / "purple")
    result = run_cli("evaluate", model, other, code=2)
    assert "purple" in result.stderr and "not known to the model" in result.stderr
