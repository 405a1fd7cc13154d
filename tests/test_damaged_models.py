"""A model folder damaged in any of the ways below is one clear error (exit code 2): no traceback, no code.

``DAMAGES`` is the catalogue: each entry copies a saved model folder and damages one thing in it.
``benchmarks/damage_models.py`` runs the same catalogue through the CLI as subprocesses.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE, run_cli, separable_features, write_image_folder
from safetensors.numpy import load_file, save_file

from xferkit.core.errors import XferkitError
from xferkit.heads.base import FeatureHead
from xferkit.io.data import load_splits, read_image_folder
from xferkit.model import BackboneOptions, ExtractOptions, create_head, fit_model, load_model

TINY = BackboneOptions(TINY_BACKBONE, pretrained=False, image_size=32)
QUIET = ExtractOptions(batch_size=8, workers=0)
MODEL, HEAD, ARRAYS = "model.json", "head.json", "head.safetensors"


def marker(folder: Path) -> Path:
    """The file a malicious pickle in *folder* creates if anything unpickles it."""
    return folder.parent / "code-ran"


class Payload:
    """Unpickled, it opens (creates) the marker file: proof that loading ran code from the folder."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def pickled(folder: Path) -> bytes:
    """A pickle that creates the marker of *folder* when unpickled."""
    return pickle.dumps(Payload(marker(folder)))


def torch_zip(folder: Path) -> bytes:
    """A torch checkpoint whose pickle creates the marker of *folder* when torch.load unpickles it."""
    buffer = io.BytesIO()
    torch.save({"weight": Payload(marker(folder))}, buffer)
    return buffer.getvalue()


# --- ways to damage one file of a copied folder ------------------------------------------------------
Apply = Callable[[Path], None]


def write(name: str, content: bytes | Callable[[Path], bytes]) -> Apply:
    """Replace file *name* by *content* (bytes, or made from the folder)."""
    return lambda folder: (folder / name).write_bytes(content(folder) if callable(content) else content)


def remove(name: str) -> Apply:
    """Delete file *name*."""
    return lambda folder: (folder / name).unlink()


def link(name: str, target: str) -> Apply:
    """Replace file *name* by a symbolic link to *target*."""
    def apply(folder: Path) -> None:
        (folder / name).unlink()
        (folder / name).symlink_to(target)
    return apply


def each(*applies: Apply) -> Apply:
    """All of *applies*, in turn: damage made consistent across files."""
    def apply(folder: Path) -> None:
        for one in applies:
            one(folder)
    return apply


def truncate(name: str) -> Apply:
    """Keep the first half of file *name*, as an interrupted copy would."""
    def apply(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:len(data) // 2])
    return apply


def edit(name: str, change: Callable[[dict], object]) -> Apply:
    """Load JSON file *name*, let *change* edit it in place, write it back."""
    def apply(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))
    return apply


def arrays(change: Callable[[dict], object]) -> Apply:
    """Load ``head.safetensors`` as numpy arrays, let *change* edit the dict, write it back."""
    def apply(folder: Path) -> None:
        tensors = dict(load_file(folder / ARRAYS))
        change(tensors)
        save_file({k: v.copy(order="C") for k, v in tensors.items()}, folder / ARRAYS)
    return apply


DELETE = object()


def at(name: str, *keys: str, value: object = DELETE) -> Apply:
    """Set the value at the path *keys* of JSON file *name* (delete it, given no value)."""
    def change(data: dict) -> None:
        for key in keys[:-1]:
            data = data[key]
        if value is DELETE:
            del data[keys[-1]]
        else:
            data[keys[-1]] = value
    return edit(name, change)


def weights_file_pickle(folder: Path) -> None:
    """Point the manifest's weights file at a torch checkpoint in the folder whose pickle runs code."""
    (folder / "evil.pt").write_bytes(torch_zip(folder))
    edit(MODEL, lambda m: m["backbone"].update(weights_file=str(folder / "evil.pt"), pretrained=True))(folder)


def set_array(key: str, make: Callable[[np.ndarray], np.ndarray]) -> Apply:
    """Replace array *key* of ``head.safetensors`` by *make* of it."""
    return arrays(lambda a: a.update({key: make(a[key])}))


def with_nan(array: np.ndarray) -> np.ndarray:
    """A copy of float *array* whose first value is NaN."""
    array = array.copy()
    array.flat[0] = np.nan
    return array


@dataclass(frozen=True)
class Damage:
    """One kind of damage to the *model* folder, and through which command it is loaded.

    The error must name *file* (None: the folder) and contain *says*.
    """

    kind: str
    file: str | None
    apply: Apply
    model: str = "lr"
    command: str = "predict"
    says: str = ""


FT = "finetune"
PRE = ("backbone", "preprocess")
DAMAGES = [
    # model.json: the file itself
    Damage("model.json missing", MODEL, remove(MODEL)),
    Damage("model.json not JSON", MODEL, write(MODEL, b"{not json")),
    Damage("model.json truncated", MODEL, truncate(MODEL)),
    Damage("model.json empty", MODEL, write(MODEL, b"")),
    Damage("model.json binary, not UTF-8", MODEL, write(MODEL, b"\xff\xfe\x00\x81")),
    Damage("model.json a pickle", MODEL, write(MODEL, pickled)),
    Damage("model.json a JSON list", MODEL, write(MODEL, b"[1, 2]")),
    Damage("model.json nested 100000 deep", MODEL, write(MODEL, b"[" * 100_000)),
    Damage("model.json a link to /dev/zero", None, link(MODEL, "/dev/zero"), says="no model.json"),
    # model.json: its schema
    Damage("format_version 1", None, at(MODEL, "format_version", value=1), says="model format 1"),
    Damage("format_version 1, a fake traceback in a name", None,
           each(at(MODEL, "format_version", value=1), at(MODEL, "head", "name", value="\nTraceback (most")),
           says="--head HEAD "),
    Damage("format_version a string", MODEL, at(MODEL, "format_version", value="2")),
    Damage("format_version missing", MODEL, at(MODEL, "format_version")),
    Damage("kind missing", MODEL, at(MODEL, "kind")),
    Damage("unknown top-level key", MODEL, at(MODEL, "exec", value="rm -rf /"), says="exec"),
    Damage("kind unknown", MODEL, at(MODEL, "kind", value="svm")),
    Damage("kind pixels on a features model", HEAD, at(MODEL, "kind", value="pixels"),
           says="unknown pixel trainer 'lr'"),
    Damage("kind features on a pixels model", HEAD, at(MODEL, "kind", value="features"), model=FT,
           says="unknown head 'finetune'"),
    Damage("classes a string", MODEL, at(MODEL, "classes", value="blue,green,red")),
    Damage("classes empty", MODEL, at(MODEL, "classes", value=[])),
    Damage("classes duplicated", MODEL, at(MODEL, "classes", value=["blue", "blue", "red"])),
    Damage("classes hold a number", MODEL, at(MODEL, "classes", value=["blue", 1, "red"])),
    Damage("classes permuted", MODEL, edit(MODEL, lambda m: m["classes"].reverse()), says="classes differ"),
    Damage("classes of a pixels model renamed", MODEL, at(MODEL, "classes", value=["a", "b", "c"]), model=FT,
           says="classes differ"),
    Damage("head name unknown", MODEL, at(MODEL, "head", "name", value="svm"), says="head names differ"),
    Damage("head params a list", MODEL, at(MODEL, "head", "params", value=[1.0])),
    Damage("head params nested", MODEL, at(MODEL, "head", "params", "C", value={"x": 1})),
    Damage("head params differ from head.json", MODEL, at(MODEL, "head", "params", "C", value=7.0),
           says="head params differ"),
    Damage("head lacks params", MODEL, at(MODEL, "head", "params")),
    Damage("backbone name unknown", MODEL, at(MODEL, "backbone", "name", value="resnet9000")),
    Damage("backbone name with an unknown tag", MODEL, at(MODEL, "backbone", "name", value="test_resnet.x")),
    Damage("backbone name a number", MODEL, at(MODEL, "backbone", "name", value=18)),
    Damage("weights_digest of other weights", MODEL, at(MODEL, "backbone", "weights_digest", value="0" * 64),
           says="not the ones this model was trained on"),
    Damage("weights_digest not a sha256", MODEL, at(MODEL, "backbone", "weights_digest", value="x")),
    Damage("layer unknown", MODEL, at(MODEL, "backbone", "layer", value="layer9")),
    Damage("layer of another width", MODEL, at(MODEL, "backbone", "layer", value="layer1"),
           says="gives 32 features"),
    Damage("pretrained a string", MODEL, at(MODEL, "backbone", "pretrained", value="no")),
    Damage("pretrained, weights not here offline", MODEL, at(MODEL, "backbone", "pretrained", value=True)),
    Damage("weights_file a malicious torch file", MODEL, weights_file_pickle, says="cannot read weights"),
    Damage("weights_file with a line break", MODEL, at(MODEL, "backbone", "weights_file", value="w\nw")),
    Damage("weights_file missing", MODEL,
           edit(MODEL, lambda m: m["backbone"].update(weights_file="/nowhere/w.pt", pretrained=True))),
    Damage("input_size 0", MODEL, at(MODEL, *PRE, "input_size", value=[0, 0])),
    Damage("input_size three numbers", MODEL, at(MODEL, *PRE, "input_size", value=[32] * 3)),
    Damage("input_size strings", MODEL, at(MODEL, *PRE, "input_size", value=["32", "32"])),
    Damage("input_size a 400-digit number", MODEL, at(MODEL, *PRE, "input_size", value=[10**400, 32])),
    Damage("crop_pct 0", MODEL, at(MODEL, *PRE, "crop_pct", value=0)),
    Damage("crop_pct a string", MODEL, at(MODEL, *PRE, "crop_pct", value="0.9")),
    Damage("crop_pct 1e-300", MODEL, at(MODEL, *PRE, "crop_pct", value=1e-300)),
    Damage("interpolation unknown", MODEL, at(MODEL, *PRE, "interpolation", value="sinc")),
    Damage("mean two numbers", MODEL, at(MODEL, *PRE, "mean", value=[0.5, 0.5])),
    Damage("mean NaN", MODEL, at(MODEL, *PRE, "mean", value=[float("nan")] * 3)),
    Damage("std 0", MODEL, at(MODEL, *PRE, "std", value=[0, 0, 0])),
    Damage("preprocess missing", MODEL, at(MODEL, *PRE)),
    Damage("calibration temperature 0", MODEL, at(MODEL, "calibration", "temperature", value=0)),
    Damage("calibration temperature a string", MODEL, at(MODEL, "calibration", "temperature", value="1.0"),
           command="evaluate"),
    Damage("calibration lacks a key", MODEL, at(MODEL, "calibration", "nll_after")),
    Damage("calibration a list", MODEL, at(MODEL, "calibration", value=[1.0])),
    Damage("validation_metrics a list", MODEL, at(MODEL, "validation_metrics", value=[])),
    Damage("info a string", MODEL, at(MODEL, "info", value="x"), command="evaluate"),
    Damage("info.data a number", MODEL, at(MODEL, "info", "data", value=3), command="evaluate-default"),
    # head.json of a feature head
    Damage("head.json missing", HEAD, remove(HEAD)),
    Damage("head.json not JSON", HEAD, write(HEAD, b"{not json")),
    Damage("head.json truncated", HEAD, truncate(HEAD)),
    Damage("head.json a JSON list", HEAD, write(HEAD, b"[]")),
    Damage("head.json a pickle", HEAD, write(HEAD, pickled)),
    Damage("head.json nested 100000 deep", HEAD, write(HEAD, b'{"a":' * 100_000)),
    Damage("head.json unknown key", HEAD, at(HEAD, "code", value="import os"), says="code"),
    Damage("head.json lacks params", HEAD, at(HEAD, "params")),
    Damage("unknown param", HEAD, at(HEAD, "params", "gamma", value=1), says="gamma"),
    Damage("missing param", HEAD, at(HEAD, "params", "C"), says="params lacks C"),
    Damage("param out of range", HEAD, at(HEAD, "params", "C", value=-1.0), command="evaluate",
           says="'C' parameter"),
    Damage("param of the wrong type", HEAD, at(HEAD, "params", "max_iter", value="many"), says="'max_iter'"),
    Damage("fitted scalar out of its options", HEAD, at(HEAD, "fitted", "solver_", value="magic"),
           says="'solver_'"),
    Damage("fitted scalar missing", HEAD, at(HEAD, "fitted", "C_"), says="fitted lacks C_"),
    Damage("classes_dtype unknown", HEAD, at(HEAD, "classes_dtype", value="<q9")),
    Damage("classes_dtype too narrow", HEAD, at(HEAD, "classes_dtype", value="<U1")),
    Damage("classes of the head renamed", HEAD, at(HEAD, "classes", value=["a", "b", "c"]),
           says="classes differ"),
    Damage("n_features_in a string", HEAD, at(HEAD, "n_features_in", value="96")),
    Damage("n_features_in a 400-digit number", ARRAYS, at(HEAD, "n_features_in", value=10**400)),
    Damage("classes 400-digit numbers", HEAD, at(HEAD, "classes", value=[10**400, 1, 2])),
    Damage("n_features_in another width", ARRAYS, at(HEAD, "n_features_in", value=95), says="'mean'"),
    Damage("head.json of another head", HEAD, at(HEAD, "name", value="gp"), says="params lacks"),
    # head.safetensors of a feature head
    Damage("head.safetensors missing", ARRAYS, remove(ARRAYS)),
    Damage("head.safetensors empty", ARRAYS, write(ARRAYS, b"")),
    Damage("head.safetensors truncated", ARRAYS, truncate(ARRAYS), command="evaluate"),
    Damage("head.safetensors garbage", ARRAYS, write(ARRAYS, b"\x00" * 20)),
    Damage("head.safetensors a pickle", ARRAYS, write(ARRAYS, pickled)),
    Damage("head.safetensors a torch zip", ARRAYS, write(ARRAYS, torch_zip)),
    Damage("head.safetensors a link to /dev/zero", ARRAYS, link(ARRAYS, "/dev/zero")),
    Damage("coef of the wrong shape", ARRAYS, set_array("coef", lambda a: a[:, :-1]), says="'coef' is"),
    Damage("coef NaN", ARRAYS, set_array("coef", with_nan), says="'coef' holds NaN"),
    Damage("coef float32", ARRAYS, set_array("coef", lambda a: a.astype(np.float32)), says="'coef' is float"),
    Damage("coef integers", ARRAYS, set_array("coef", lambda a: a.astype(np.int64)), says="'coef' is int64"),
    Damage("intercept missing", ARRAYS, arrays(lambda a: a.pop("intercept")), says="intercept"),
    Damage("extra array", ARRAYS, arrays(lambda a: a.update(extra=np.zeros(3))), says="extra"),
    Damage("scale zero", ARRAYS, set_array("scale", np.zeros_like), says="'scale'"),
    Damage("mean infinite", ARRAYS, set_array("mean", lambda a: np.full_like(a, np.inf)), says="'mean'"),
    # a pixel trainer's head.json
    Damage("finetune head.json not JSON", HEAD, write(HEAD, b"{"), model=FT),
    Damage("finetune unknown param", HEAD, at(HEAD, "params", "beta", value=0.9), model=FT, says="beta"),
    Damage("finetune missing param", HEAD, at(HEAD, "params", "lr"), model=FT, says="params lacks lr"),
    Damage("finetune unfreeze not a number", HEAD, at(HEAD, "params", "unfreeze", value="most"), model=FT,
           says="'unfreeze'"),
    Damage("finetune unfreeze more blocks than exist", HEAD, at(HEAD, "params", "unfreeze", value="99"),
           model=FT, says="unfreeze='99'"),
    Damage("finetune backbone unknown", HEAD, at(HEAD, "params", "backbone", value="nonet"), model=FT,
           says="nonet"),
    Damage("finetune backbone with an unknown tag", HEAD, at(HEAD, "params", "backbone", value="resnet18.x"),
           model=FT, command="evaluate"),
    Damage("finetune image_size beyond 4096 in both files", HEAD,
           each(at(HEAD, "params", "image_size", value=10**5),
                at(MODEL, "head", "params", "image_size", value=10**5)), model=FT, says="image_size"),
    Damage("finetune weights with a line break", HEAD, at(HEAD, "params", "weights", value="w\nw"),
           model=FT, says="line breaks"),
    Damage("finetune classes_dtype junk", HEAD, at(HEAD, "classes_dtype", value="junk"), model=FT),
    Damage("finetune history a list", HEAD, at(HEAD, "info", "history", value=[]), model=FT),
    Damage("finetune weights_digest junk", HEAD, at(HEAD, "info", "backbone", "weights_digest", value=None),
           model=FT),
    Damage("finetune saved as another trainer", HEAD, at(HEAD, "name", value="scratch"), model=FT,
           says="params lacks arch"),
    Damage("finetune unknown trainer", HEAD, at(HEAD, "name", value="__import__"), model=FT),
    # a pixel trainer's head.safetensors
    Damage("finetune head.safetensors truncated", ARRAYS, truncate(ARRAYS), model=FT),
    Damage("finetune head.safetensors a pickle", ARRAYS, write(ARRAYS, pickled), model=FT),
    Damage("finetune head.safetensors a torch zip", ARRAYS, write(ARRAYS, torch_zip), model=FT),
    Damage("finetune tensor of the wrong shape", ARRAYS, set_array("classifier.weight", lambda a: a[:-1]),
           model=FT, says="'classifier.weight' is"),
    Damage("finetune tensor NaN", ARRAYS, set_array("classifier.weight", with_nan), model=FT,
           command="evaluate", says="'classifier.weight' holds NaN"),
    Damage("finetune tensor float64", ARRAYS, set_array("classifier.bias", lambda a: a.astype(np.float64)),
           model=FT, says="'classifier.bias' is"),
    Damage("finetune running variance negative", ARRAYS, set_array("body.bn1.running_var", np.negative),
           model=FT, command="evaluate", says="negative variances"),
    Damage("finetune tensor missing", ARRAYS, arrays(lambda a: a.pop("classifier.bias")), model=FT,
           says="classifier.bias"),
    Damage("finetune tensor extra", ARRAYS, arrays(lambda a: a.update(extra=np.zeros(2, np.float32))),
           model=FT, says="extra"),
]


def build_models(root: Path) -> dict[str, tuple]:
    """An lr and a finetune model fitted on generated colour images, saved under *root*; the test images.

    Returns ``{name: (model, folder)}`` with ``"test"`` mapping to ``(None, test image folder)``.
    """
    splits = load_splits(write_image_folder(root / "data", per_class=8))
    built = {"test": (None, write_image_folder(root / "test", per_class=2, seed=5))}
    for head, params in (("lr", {}), ("finetune", {"epochs": 1})):
        model, _ = fit_model(head, params, backbone=TINY, train=splits.train, val=splits.val, options=QUIET)
        built[head] = (model, model.save(root / "models" / head))
    return built


def damaged_copy(damage: Damage, built: dict[str, tuple], where: Path) -> Path:
    """A copy of the damage's model folder in *where*, damaged."""
    copy = shutil.copytree(built[damage.model][1], where / damage.model)
    damage.apply(copy)
    return copy


def cli_args(damage: Damage, folder: Path, built: dict[str, tuple]) -> list[str]:
    """The command line (after ``xferkit``) that loads *folder* as the damage's command does."""
    test = built["test"][1]
    return {"predict": ["predict", folder, next(test.glob("*/*.png"))],
            "evaluate": ["evaluate", folder, test], "evaluate-default": ["evaluate", folder]}[damage.command]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XFERKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        return build_models(tmp_path_factory.mktemp("damage"))


def test_the_catalogue_is_large_and_each_kind_is_named_once():
    assert len(DAMAGES) >= 40 and len({d.kind for d in DAMAGES}) == len(DAMAGES)


def test_the_pickled_payload_would_run_if_anything_unpickled_it(tmp_path):
    folder = tmp_path / "model"
    pickle.loads(pickled(folder))
    assert marker(folder).exists()


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.kind)
def test_a_damaged_folder_is_one_clear_error(damage, built, tmp_path):
    folder = damaged_copy(damage, built, tmp_path)
    result = run_cli(*cli_args(damage, folder, built), code=2)
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error:") and result.stderr.count("error:") == 1, result.stderr
    assert (damage.file or folder.name) in result.stderr and damage.says in result.stderr
    assert not marker(folder).exists()


@pytest.mark.parametrize("name", ["lr", "finetune"])
def test_an_undamaged_copy_predicts_identically(name, built, tmp_path):
    model, folder = built[name]
    copy = shutil.copytree(folder, tmp_path / name)
    paths = read_image_folder(built["test"][1]).paths
    before, after = model.predict(paths, QUIET), load_model(copy).predict(paths, QUIET)
    np.testing.assert_array_equal(after.proba, before.proba)
    run_cli("predict", copy, built["test"][1])


HEADS = {"gp exact": ("gp", {"method": "exact", "dim": 4, "ard": True}),
         "gp svgp": ("gp", {"method": "svgp", "inducing": 8, "epochs": 2}),
         "bnn": ("bnn", {"hidden": 4, "epochs": 2})}


@pytest.mark.parametrize("head", HEADS)
def test_every_array_of_a_gp_or_bnn_head_is_checked(head, tmp_path):
    X, y = separable_features(n_per_class=10)
    folder = tmp_path / "head"
    name, params = HEADS[head]
    fitted = create_head(name, **params).fit(X, y)
    fitted.save(folder)
    saved = load_file(folder / ARRAYS)
    for key, array in saved.items():
        others = {k: v for k, v in saved.items() if k != key}
        for damaged in (others, {**others, key: np.append(array, array.flat[:1])},
                        {**others, key: array.astype(np.float16)}):
            save_file(damaged, folder / ARRAYS)
            # the exact GP's training inputs are sized by its targets: a longer target list misfits them
            with pytest.raises(XferkitError, match=rf"{ARRAYS}: .*({re.escape(key)}|train_inputs).*damaged"):
                FeatureHead.load(folder)
    save_file(saved, folder / ARRAYS)
    # equal on a CPU; CUDA's reductions may differ in the last bits (seen: 9e-15 relative on an H200)
    np.testing.assert_allclose(FeatureHead.load(folder).predict_proba(X), fitted.predict_proba(X), rtol=1e-10)
