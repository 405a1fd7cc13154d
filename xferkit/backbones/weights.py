"""Where a backbone's weights come from: decided in one function, in one order, and reported.

1. an explicit file (``--weights``); 2. random initialisation, only when asked for
(``--no-pretrained``); 3. the framework's cache: the Hugging Face cache (``HF_HOME`` /
``HF_HUB_CACHE``, as huggingface_hub resolves them) or the torch hub cache
(``$TORCH_HOME/hub/checkpoints``); 4. an installed package that ships a published file
(checked by the hash in its name); 5. a download, unless ``HF_HUB_OFFLINE`` is set (for both
families); 6. otherwise one error naming the file and the ways out.
"""

from __future__ import annotations

import functools
import hashlib
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import huggingface_hub
import torch
from huggingface_hub import constants as hf_constants
from torch import nn

from xferkit.core.errors import XferkitError
from xferkit.core.reporting import SILENT, Reporter

#: Seconds to wait for the weights server before saying the network is unreachable.
CONNECT_TIMEOUT = 5.0
#: File endings of weights that installed packages may ship.
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass(frozen=True)
class PublishedFile:
    """One published weights file: on the Hugging Face Hub (repository and file) or at a URL."""

    filename: str
    hf_hub_id: str | None = None
    url: str | None = None
    #: torchvision's name for these weights (``IMAGENET1K_V1``), where it has one.
    tag: str | None = None

    @property
    def sha256_prefix(self) -> str | None:
        """torch hub file names end in the first hex digits of their sha256 (``resnet18-f37072fd.pth``)."""
        if self.url is None or "-" not in self.filename:
            return None
        prefix = self.filename.rsplit("-", 1)[-1].split(".")[0]
        return prefix if len(prefix) >= 8 and all(c in "0123456789abcdef" for c in prefix) else None

    def __str__(self) -> str:
        if self.hf_hub_id:
            return f"{self.filename} of {self.hf_hub_id} on the Hugging Face Hub"
        return f"{self.filename} ({self.url})"


@dataclass(frozen=True)
class ResolvedWeights:
    """A weights file to load (``None``: random initialisation), what to tell the user, which file it is."""

    path: Path | None
    source: str
    published: PublishedFile | None = None


def resolve_weights(name: str, published: list[PublishedFile], explicit: str | Path | None = None,
                    pretrained: bool = True, reporter: Reporter = SILENT) -> ResolvedWeights:
    """The weights for backbone *name*, from the first source that has them (see the module doc)."""
    if explicit is not None:
        if not pretrained:
            raise XferkitError("--weights and --no-pretrained contradict each other; pick one.")
        path = Path(explicit)
        if not path.is_file():
            raise XferkitError(f"weights file {path} does not exist.")
        return ResolvedWeights(path, f"file {path}", _identify(path, published))
    if not pretrained:
        return ResolvedWeights(None, "random initialisation (--no-pretrained)")
    if not published:
        raise missing_weights(name, "(no published weights)", "neither timm nor torchvision publishes any")
    local = find_local(published)
    if local is not None:
        return local
    if hf_constants.HF_HUB_OFFLINE:
        raise missing_weights(name, str(published[0]), "HF_HUB_OFFLINE is set, so nothing is downloaded")
    return _download(name, published, reporter)


def _identify(path: Path, published: list[PublishedFile]) -> PublishedFile | None:
    """The published file that *path* is a copy of (by the hash in its name), if any."""
    prefixes = {p.sha256_prefix: p for p in published if p.sha256_prefix}
    if not prefixes:
        return None
    digest = file_sha256(path)
    return next((p for prefix, p in prefixes.items() if digest.startswith(prefix)), None)


def find_local(published: list[PublishedFile]) -> ResolvedWeights | None:
    """The first published file found without a download: in a cache, then in an installed package."""
    for candidate in published:
        found = _cached(candidate)
        if found:
            return ResolvedWeights(*found, candidate)
    for candidate in published:
        path = _packaged(candidate)
        if path:
            return ResolvedWeights(path, f"installed offline-weights package {path}", candidate)
    return None


def _cached(candidate: PublishedFile) -> tuple[Path, str] | None:
    if candidate.hf_hub_id:
        found = huggingface_hub.try_to_load_from_cache(candidate.hf_hub_id, candidate.filename,
                                                       cache_dir=hf_constants.HF_HUB_CACHE)
        return (Path(found), f"Hugging Face cache {found}") if isinstance(found, str) else None
    path = torch_hub_checkpoints() / candidate.filename
    return (path, f"torch hub cache {path}") if path.is_file() else None


def torch_hub_checkpoints() -> Path:
    """Where torch hub keeps downloaded weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _packaged(candidate: PublishedFile) -> Path | None:
    """A file with the published name in an installed distribution, its content matching the name's hash."""
    if not candidate.sha256_prefix:
        return None
    for path in installed_weight_files().get(candidate.filename, ()):
        if path.is_file() and file_sha256(path).startswith(candidate.sha256_prefix):
            return path
    return None


@functools.cache
def installed_weight_files() -> dict[str, list[Path]]:
    """Weights-like files (``.pth``, ``.pt``, ``.bin``, ``.safetensors``) of installed distributions, by name.

    One pass over the distributions' RECORD texts, once per process.
    """
    found: dict[str, list[Path]] = {}
    for dist in metadata.distributions():
        for line in (dist.read_text("RECORD") or "").splitlines():
            file = line.split(",", 1)[0]
            if file.endswith(WEIGHT_SUFFIXES):
                found.setdefault(file.rsplit("/", 1)[-1], []).append(Path(dist.locate_file(file)))
    return found


def reachable(url: str, timeout: float = CONNECT_TIMEOUT) -> bool:
    """Whether *url*'s host accepts a connection within *timeout* seconds (name lookup included)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    with ThreadPoolExecutor(1) as pool:  # getaddrinfo has no timeout of its own
        future = pool.submit(socket.create_connection, (parts.hostname, port), timeout)
        try:
            future.result(timeout=timeout).close()
            return True
        except (OSError, FutureTimeout):
            return False


def _download(name: str, published: list[PublishedFile], reporter: Reporter) -> ResolvedWeights:
    server = hf_constants.ENDPOINT if published[0].hf_hub_id else published[0].url
    if not reachable(server):
        raise missing_weights(name, str(published[0]), f"{urlsplit(server).hostname} cannot be reached "
                              f"within {CONNECT_TIMEOUT:g} s (no network?)")
    reasons = []
    for candidate in published:
        reporter.note(f"weights for {name} are not cached: downloading {candidate} "
                      "(HF_HUB_OFFLINE=1 forbids this)")
        try:
            if candidate.hf_hub_id:
                path = Path(huggingface_hub.hf_hub_download(candidate.hf_hub_id, candidate.filename))
            else:
                path = torch_hub_checkpoints() / candidate.filename
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(candidate.url, str(path), candidate.sha256_prefix,
                                               progress=False)
        except Exception as err:  # network, authentication, a missing file: all end in the same advice
            first_line = str(err).splitlines()[0] if str(err) else ""
            reasons.append(f"{type(err).__name__}: {first_line}"[:200])
            continue
        return ResolvedWeights(path, f"downloaded {path}", candidate)
    raise missing_weights(name, str(published[0]), f"the download failed ({'; '.join(reasons)})")


def missing_weights(name: str, wanted: str, why: str) -> XferkitError:
    return XferkitError(
        f"no pretrained weights for {name} are available here: {why}. Needed: {wanted}. "
        "Ways out: (1) pass a local checkpoint with --weights FILE (safetensors or a torch "
        "state dict); (2) put the weights in the cache (for timm, run once on a connected machine "
        "with the same HF_HOME; for torchvision, copy the file into $TORCH_HOME/hub/checkpoints); "
        "(3) unset HF_HUB_OFFLINE on a connected machine to download them; or (4) pass "
        "--no-pretrained to use random weights deliberately (a baseline, not transfer)."
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a plain torch checkpoint (``weights_only=True``: no code runs)."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, zip and unpickler errors all mean "not a weights file"
        raise XferkitError(f"cannot read weights file {path}: {str(err).splitlines()[0]}. It must be "
                           "a safetensors file or a torch checkpoint of plain tensors.") from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise XferkitError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}


def load_checkpoint(model: nn.Module, path: Path, classifier: tuple[str, ...] = ()) -> None:
    """Load a local state dict strictly, ignoring only the old classifier's tensors."""
    state = read_state_dict(path)
    own = model.state_dict()
    state = {k: v for k, v in state.items()
             if k in own or not any(k == c or k.startswith(c + ".") for c in classifier)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        problems = [f"{label}: {few(keys)}" for label, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("keys with other shapes", wrong_shape)) if keys]
        raise XferkitError(f"{path} does not fit this backbone's architecture; "
                           + "; ".join(problems)
                           + ". Check that --backbone names the model the file was saved from.")
    model.load_state_dict(state)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
