"""``xferkit export``: one ONNX graph per model whose onnxruntime predictions match ``xferkit predict``."""

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE, run_cli, separable_features, write_image_folder

from xferkit.api import evaluate, export, predict
from xferkit.heads.bnn import BNNHead
from xferkit.heads.gp import GPHead
from xferkit.heads.lr import LogisticHead
from xferkit.io.data import load_splits, read_image_folder
from xferkit.model import BackboneOptions, ExtractOptions, fit_model, load_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TINY = BackboneOptions(TINY_BACKBONE, pretrained=False, image_size=32)
# on the CPU: ONNX graphs compute in float32, and on CUDA xferkit's backbone runs in bf16
QUIET = ExtractOptions(device="cpu", batch_size=8, workers=0, cache=False)
#: Model name -> (head, hyper-parameters); few epochs: the heads need not be good, only exported faithfully.
MODELS = {"lr": ("lr", {}), "bnn": ("bnn", {"epochs": 5}), "gp": ("gp", {"epochs": 5}),
          "gp-svgp": ("gp", {"method": "svgp", "inducing": 8, "epochs": 5}),
          "finetune": ("finetune", {"epochs": 1, "unfreeze": "1"}), "scratch": ("scratch", {"epochs": 1})}
#: Pixel trainers take longer to fit than the default suite allows.
SLOW = {"finetune", "scratch"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Training splits and 7 test images (3 classes)."""
    root = tmp_path_factory.mktemp("colours")
    splits = load_splits(write_image_folder(root / "data", per_class=10))
    test = write_image_folder(root / "test", per_class=3, seed=5)
    return splits, test, read_image_folder(test).paths[:7]


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    """``saved(name)``: the folder of that model of :data:`MODELS`, fitted once per module."""
    folders = {}

    def fitted(name: str):
        if name not in folders:
            model, _ = fit_model(*MODELS[name], backbone=TINY, train=data[0].train, val=data[0].val,
                                 options=QUIET)
            folders[name] = model.save(tmp_path_factory.mktemp("models") / name)
        return folders[name]
    return fitted


@pytest.fixture(scope="module")
def exported(saved, tmp_path_factory):
    """The lr model exported (with the faster TorchScript exporter)."""
    output = tmp_path_factory.mktemp("onnx") / "lr.onnx"
    return export(saved("lr"), output, exporter="torchscript"), saved("lr")


@pytest.mark.parametrize("name", [pytest.param(m, marks=[pytest.mark.slow] * (m in SLOW)) for m in MODELS])
def test_onnxruntime_matches_predict_for_every_head(name, saved, data, tmp_path):
    result = export(saved(name), tmp_path / f"{name}.onnx", exporter="torchscript")
    paths = data[2]
    want = load_model(saved(name)).predict(paths, QUIET)
    got = load_model(result.output).predict(paths, QUIET)
    np.testing.assert_array_equal(got.kept, want.kept)
    assert np.abs(got.proba - want.proba).max() <= 1e-4
    np.testing.assert_allclose(got.uncertainty["entropy"], want.uncertainty["entropy"], atol=1e-3)
    assert result.max_abs_diff <= 1e-5 and result.metadata.exporter == "torchscript"


def test_bnn_keeps_the_closer_of_its_two_approximations(saved, tmp_path):
    result = export(saved("bnn"), tmp_path / "bnn.onnx", exporter="torchscript")
    errors = result.head_errors
    assert set(errors) == {"mc samples", "mean weights + probit"}
    assert result.metadata.head_method == min(errors, key=errors.get)


@pytest.mark.slow
def test_the_dynamo_exporter_matches_too(saved, data, tmp_path):
    result = export(saved("lr"), tmp_path / "lr.onnx", exporter="dynamo")
    assert result.metadata.exporter == "dynamo"
    want = load_model(saved("lr")).predict(data[2], QUIET).proba
    assert np.abs(load_model(result.output).predict(data[2], QUIET).proba - want).max() <= 1e-4


def test_batch_size_is_dynamic(exported, data):
    result, folder = exported
    session = ort.InferenceSession(str(result.output), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).integers(0, 256, (7, 3, 32, 32), dtype=np.uint8)
    seven = session.run(["probabilities"], {"image": images})[0]
    one = session.run(["probabilities"], {"image": images[:1]})[0]
    assert seven.shape == (7, 3) and one.shape == (1, 3)
    np.testing.assert_allclose(seven.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(one[0], seven[0], atol=1e-6)
    model = load_model(result.output)
    by_one = model.predict(data[2], ExtractOptions(batch_size=1, workers=0)).proba
    np.testing.assert_allclose(by_one, model.predict(data[2], QUIET).proba, atol=1e-6)


def test_metadata_round_trips(exported):
    result, folder = exported
    model = load_model(folder)
    props = {p.key: p.value for p in onnx.load(str(result.output)).metadata_props}
    assert json.loads(props["xferkit.classes"]) == model.classes
    assert json.loads(props["xferkit.input_size"]) == [32, 32]
    recipe = json.loads(props["xferkit.preprocess"])
    assert recipe["resize_size"] == model.backbone.preprocess.resize_size
    preprocess = model.backbone.preprocess
    assert (recipe["interpolation"], recipe["crop_pct"]) == (preprocess.interpolation, preprocess.crop_pct)
    assert props["xferkit.backbone"] == TINY_BACKBONE
    assert props["xferkit.weights_digest"] == model.backbone.weights_digest
    assert float(props["xferkit.temperature"]) == model.calibration.temperature
    loaded = load_model(result.output)
    assert loaded.metadata == result.metadata and loaded.classes == model.classes
    assert loaded.metadata.preprocess == model.backbone.preprocess


def test_evaluate_and_predict_read_the_onnx_file(exported, data):
    result, folder = exported
    onnx_eval, folder_eval = (evaluate(m, data[1], options=QUIET) for m in (result.output, folder))
    assert onnx_eval.metrics["accuracy"] == folder_eval.metrics["accuracy"]
    assert onnx_eval.metrics["nll"] == pytest.approx(folder_eval.metrics["nll"], abs=1e-4)
    labels = [p.label for p in predict(result.output, data[2]).predictions]
    assert labels == [p.label for p in predict(folder, data[2]).predictions]


def test_cli_exports_and_predicts(saved, data, tmp_path):
    output = tmp_path / "m.onnx"
    summary = json.loads(run_cli("export", saved("lr"), "-o", output, "--exporter", "torchscript",
                                 "--json").stdout)
    assert summary["bytes"] == output.stat().st_size and summary["head_method"] == "exact"
    run_cli("export", saved("lr"), "-o", output, "--exporter", "torchscript", code=2)  # exists: needs --force
    run_cli("export", saved("lr"), "-o", output, "--exporter", "torchscript", "--force")
    rows = json.loads(run_cli("predict", output, data[2][0], "--json").stdout)["predictions"]
    assert rows[0]["label"] == predict(saved("lr"), data[2][:1]).predictions[0].label


def test_benchmark_measures_both_side_by_side(saved, data, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    bench = importlib.import_module("onnx_export")
    result = bench.main([str(saved("lr")), str(data[1]), "--exporter", "torchscript", "--batch-size", "4",
                         "--workers", "0", "--json", str(tmp_path / "onnx.json")])
    rates = result["images_per_s"]
    assert result["images"] == 9 and result["max_abs_proba_diff"] <= 1e-4 and result["file_mb"] > 0
    ratio = rates["onnxruntime"] / rates["xferkit"]
    assert result["onnxruntime_over_xferkit"] == pytest.approx(ratio, rel=0.05)
    assert json.loads((tmp_path / "onnx.json").read_text()) == result
    assert "images/s on 9 images" in capsys.readouterr().out


def _foreign_onnx(path):
    """A valid ONNX file that xferkit did not write: an identity graph without metadata."""
    helper = onnx.helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize("case, message", [
    ("not-a-model", "is not an xferkit model folder"),
    ("unwritable", "cannot write"),
    ("suffix", "with the .onnx suffix"),
    ("foreign-overwrite", "is not an ONNX file xferkit wrote"),
    ("already-onnx", "already an exported ONNX file"),
])
def test_export_refusals_are_one_line_and_exit_2(case, message, saved, exported, tmp_path):
    folder, output = saved("lr"), tmp_path / "out.onnx"
    if case == "not-a-model":
        folder = tmp_path
    elif case == "unwritable":
        (tmp_path / "file").write_text("a file, not a folder")
        output = tmp_path / "file" / "out.onnx"
    elif case == "suffix":
        output = tmp_path / "out.bin"
    elif case == "foreign-overwrite":
        _foreign_onnx(output)
    else:
        folder = exported[0].output
    result = run_cli("export", folder, "-o", output, "--exporter", "torchscript", "--force", code=2)
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    if case == "foreign-overwrite":  # left as it was
        assert not onnx.load(str(output)).metadata_props


def test_an_onnx_file_xferkit_did_not_write_is_refused(data, tmp_path):
    result = run_cli("predict", _foreign_onnx(tmp_path / "other.onnx"), data[2][0], code=2)
    assert "not an ONNX file that `xferkit export` wrote (no xferkit metadata)" in result.output
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    assert "not an ONNX model onnxruntime can load" in run_cli("predict", tmp_path / "junk.onnx",
                                                                data[2][0], code=2).output


def test_missing_packages_name_the_extra(saved, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    output = tmp_path / "m.onnx"
    for args in (("export", saved("lr"), "-o", output), ("predict", output, data[2][0])):
        assert "pip install 'xferkit[export]'" in run_cli(*args, code=2).output


# --- the heads' torch modules against their own predict_proba (no backbone) ------------------------------
@pytest.mark.parametrize("head, n_classes", [
    (LogisticHead(), 2), (LogisticHead(), 3), (BNNHead(epochs=10, random_state=0), 3),
    (BNNHead(hidden=8, epochs=10, random_state=0), 2), (GPHead(epochs=10, random_state=0), 3),
    (GPHead(dim=4, ard=True, epochs=10, random_state=0), 2),
    (GPHead(method="svgp", inducing=8, epochs=5, random_state=0), 3),
    (GPHead(method="svgp", inducing=8, dim=4, ard=True, epochs=5, random_state=0), 2)], ids=repr)
def test_head_modules_compute_predict_proba(head, n_classes):
    X, y = separable_features(20, 8, n_classes, spread=2.0)
    head.fit(X, y)
    X_test = separable_features(5, 8, n_classes, seed=1, spread=3.0)[0]
    want = head.predict_proba(X_test)
    errors = {}
    for name, module in head.torch_modules().items():
        with torch.no_grad():
            errors[name] = np.abs(module(torch.from_numpy(X_test)).numpy() - want).max()
    assert min(errors.values()) <= 1e-5, errors
    if isinstance(head, BNNHead):  # the baked samples are predict_proba itself; the probit approximates it
        assert errors["mc samples"] < errors["mean weights + probit"] < 0.1

