"""Options the commands share, declared once, with defaults read from the library.

Head hyper-parameters reach every head through one mechanism: ``--set HEAD.PARAM=VALUE``
(``PARAM=VALUE`` for the head that repurpose or tune runs), whose help lists each head's
parameters and defaults, plus the shortcut flags of :data:`HEAD_FLAGS` that
:func:`with_head_flags` adds to repurpose, compare and tune alike. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import inspect
import re
from pathlib import Path
from typing import Annotated

import typer

from xferkit.model.options import BackboneOptions, ExtractOptions, SplitOptions
from xferkit.model.registry import HeadName, head_names, head_params, options_of

#: Defaults, as the library declares them.
BACKBONE, EXTRACT, SPLIT = BackboneOptions(), ExtractOptions(), SplitOptions()

Backbone = Annotated[str, typer.Option("--backbone", "-b", help="timm model name (e.g. resnet18, "
                     "resnet18.a1_in1k) or tv:NAME for torchvision (e.g. tv:mobilenet_v2).")]
Weights = Annotated[Path | None, typer.Option("--weights", metavar="FILE", help="Local checkpoint "
                    "(safetensors or torch state dict) instead of the published weights.")]
Pretrained = Annotated[bool, typer.Option("--pretrained/--no-pretrained", metavar="", help="Use the "
                       "backbone's pretrained weights; --no-pretrained: random weights, deliberately (a "
                       "baseline, not transfer).")]
Layer = Annotated[str | None, typer.Option("--layer", help="Take features from this intermediate "
                  "layer (global-average-pooled); `xferkit backbones NAME --layers` lists them.")]
ImageSize = Annotated[int | None, typer.Option("--image-size", min=8, max=4096, help="Override the "
                      "backbone's input size (square), e.g. 64-128 for small images on a CPU.")]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, max=65536, help="Images per forward pass.")]
Workers = Annotated[int | None, typer.Option("--workers", min=0, max=256, help="Image-decoding processes "
                    "(default: chosen from the core count). Compute threads (torch, OpenMP) are the cores "
                    "they leave, BLAS gets one; $XFERKIT_THREADS sets the compute threads instead.")]
NoCache = Annotated[bool, typer.Option("--no-cache", metavar="", help="Do not read or write the feature "
                    "cache ($XFERKIT_CACHE, default ~/.cache/xferkit).")]
Strict = Annotated[bool, typer.Option("--strict", metavar="", help="Fail on the first unreadable image "
                   "instead of skipping and counting it.")]
Json = Annotated[bool, typer.Option("--json", metavar="", help="Print one JSON document instead of tables "
                 "(progress and notes still go to stderr).")]
Force = Annotated[bool, typer.Option("--force", metavar="", help="Replace an existing output that "
                  "xferkit wrote (never anything else).")]
ValSplit = Annotated[float, typer.Option("--val-split", min=0.0, max=0.9, help="Fraction of each class "
                     "held out to calibrate and validate (when DATA has no val/).")]
Seed = Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Seed for the splits and the heads.")]
Calibrate = Annotated[bool, typer.Option("--calibrate/--no-calibrate", metavar="", help="Fit a temperature "
                      "on the validation split so that probabilities match accuracy.")]
Coverage = Annotated[float | None, typer.Option("--coverage", min=0.0, max=1.0, help="Conformal prediction "
                     "sets: for each image the labels that hold the true one with this probability (e.g. "
                     "0.9), from the model's held-out scores.")]
OodRate = Annotated[float | None, typer.Option("--ood-rate", min=0.0, max=1.0, help="False-alarm rate of the "
                    "out-of-distribution flag: the share of images like the training ones flagged "
                    "\\[default: 0.05].", show_default=False)]
Head = Annotated[HeadName, typer.Option("--head", help="How to repurpose the backbone: a head on its "
                                       "features (lr, gp, bnn) or a network trained on pixels (finetune, "
                                       "scratch).")]


def _settings_help() -> str:
    lines = [f"{name}: " + ", ".join(f"{p.name}={p.default!r}" for p in options_of(name).values())
             for name in head_names()]
    return ("HEAD.PARAM=VALUE sets one hyper-parameter (PARAM=VALUE for the head being run); repeatable. "
            "Parameters and defaults -- " + "; ".join(lines) + ".")


Settings = Annotated[list[str] | None, typer.Option("--set", metavar="HEAD.PARAM=VALUE",
                                                    help=_settings_help(), rich_help_panel="Head options")]

#: Shortcut flags: flag -> the hyper-parameter it sets in every head that has one of that name.
HEAD_FLAGS = {"--epochs": "epochs", "--max-time": "max_time", "--learning-rate": "lr", "--C": "C",
              "--weight-decay": "weight_decay", "--label-smoothing": "label_smoothing",
              "--unfreeze": "unfreeze", "--backbone-lr-mult": "backbone_lr_mult",
              "--random-freeze": "random_freeze", "--arch": "arch", "--gp-method": "method",
              "--inducing": "inducing", "--gp-dim": "dim", "--mc-samples": "mc_samples", "--hidden": "hidden",
              "--prior-std": "prior_std"}
#: Help for the flags that several heads share (the others take their head's own one-line help).
SHARED_HELP = {"epochs": "Most passes over the training data (training may stop sooner)",
               "lr": "Learning rate of the head's optimiser"}


def _flag_parameter(flag: str, param: str) -> inspect.Parameter:
    """One shortcut flag as a typer parameter: type from the heads' annotations, help and defaults listed."""
    owners = {name: head_params(name)[param] for name in head_names() if param in head_params(name)}
    first = next(iter(owners.values()))
    kinds = set(re.findall(r"\w+", first.annotation))
    kind = next((k for k in (str, float, int, bool) if k.__name__ in kinds), str)
    defaults = ", ".join(f"{name} {p.default!r}" for name, p in owners.items())
    description = SHARED_HELP.get(param, first.help).rstrip(".")
    help_text = f"{', '.join(owners)}: {description} \\[default: {defaults}]"
    option = typer.Option(flag, help=help_text, rich_help_panel="Head options", show_default=False)
    return inspect.Parameter(flag.lstrip("-").replace("-", "_") + "_flag", inspect.Parameter.KEYWORD_ONLY,
                             default=None, annotation=Annotated[kind | None, option])


def with_head_flags(command):
    """Add the :data:`HEAD_FLAGS` to *command*, which receives the given ones as ``head_flags``."""
    flags = {flag: _flag_parameter(flag, param) for flag, param in HEAD_FLAGS.items()}
    signature = inspect.signature(command, eval_str=True)
    kept = [p for p in signature.parameters.values() if p.name != "head_flags"]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        given = {HEAD_FLAGS[flag]: kwargs.pop(p.name) for flag, p in flags.items()}
        return command(*args, head_flags={k: v for k, v in given.items() if v is not None}, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*kept, *flags.values()])
    wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
    del wrapper.__wrapped__  # typer must read the new signature, not the command's own
    return wrapper
