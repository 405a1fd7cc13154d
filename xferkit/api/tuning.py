"""Bayesian optimisation of a head's hyper-parameters (Optuna's GP sampler), resumable from disk.

Each trial fits the head on the training split with parameters drawn from the head's
``search_space`` and scores it by validation NLL (accuracy breaks ties). Heads that train by
epochs report each epoch's validation NLL, and a pruner (the epoch as the resource) stops trials
whose partial learning curves trail the others', within half the epochs of unpruned tuning; the GP
learns from a pruned trial the NLL it stopped at. Trials are journalled to ``trials.journal`` in the
output folder, so an interrupted run continues where it stopped.
The best configuration is refitted on train + validation (feature heads; calibrated by
cross-fitting) and saved as a normal model.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from xferkit.api.evaluation import evaluate
from xferkit.api.fitting import repurpose
from xferkit.api.results import write_json
from xferkit.core.distributed import require_one_process
from xferkit.core.errors import XferkitError
from xferkit.core.reporting import SILENT, Reporter
from xferkit.finetune.loop import EpochEnd
from xferkit.io.data import LabelledImages, Splits, load_splits
from xferkit.io.files import atomic_write_bytes, write_error
from xferkit.model.models import fit_model
from xferkit.model.options import BackboneOptions, ExtractOptions, SplitOptions
from xferkit.model.registry import head_class, head_kind
from xferkit.model.registry import head_params as declared_params

JOURNAL = "trials.journal"
STUDY = "xferkit-tune"
#: Folds of the cross-fitting that calibrates a feature head refitted on train + validation.
REFIT_FOLDS = 5
#: The pruners ``tune`` can stop trials with (see :func:`epoch_pruner`), and the one it uses by default.
#: Hyperband by measurement (benchmarks/tune_pruning.py): successive halving alone prunes most trials at
#: the first rung, where noisy early curves mislead it (bnn on sample_data: 19 of 20 pruned, best NLL
#: 0.038 above unpruned tuning's); Hyperband's later-starting brackets hedge.
PRUNERS = ("halving", "hyperband")
PRUNER = "hyperband"
#: The samplers ``tune`` can draw trials with (see :func:`make_sampler`); both learn from pruned trials too,
#: as finished where they stopped. ``gp``, the default pruned or not, ended nearer unpruned tuning's best
#: NLL than multivariate ``tpe`` under Hyperband (benchmarks/tune_pruning.py, toy curves, three seeds).
SAMPLERS = ("gp", "tpe")
#: Each rung of the pruners keeps the best 1/REDUCTION of the trials that reach it.
REDUCTION = 3
#: A pruned tune may train this share of the epochs that its ``trials`` would unpruned, and spends it all:
#: it runs trials (more than ``trials``) while one more trained to the end would still fit. Measured with
#: :class:`EarlyRungs` (bnn on sample_data, 20 x 200 epochs, seeds 0 1 2): best validation NLL +0.0045,
#: +0.0058, +0.0217 above unpruned tuning's at 0.46, 0.46, 0.47 of its epochs; Hyperband before them, 20
#: trials: +0.0265, +0.0021, +0.0334 at 0.46, 0.42, 0.45. The target (<= 0 at <= 0.5) is not met yet.
PRUNED_SHARE = 0.5
#: Validation NLL is compared to this many decimals before accuracy breaks a tie.
NLL_DECIMALS = 4

#: ``objective(params, epoch_end) -> (validation NLL, validation accuracy)``; a trial that trains by
#: epochs calls ``epoch_end(epoch, val_nll)`` after each and stops when it returns True (pruned).
Objective = Callable[[dict, EpochEnd], tuple[float, float]]


@dataclass
class TrialRecord:
    """One finished trial as the trials table shows it."""

    number: int
    params: dict
    val_nll: float | None
    val_accuracy: float | None
    seconds: float
    error: str | None = None
    #: ``complete``, ``pruned`` (stopped early by the pruner) or ``fail``.
    state: str = "complete"
    #: Epochs the trial trained (None: the head does not train by epochs).
    epochs: int | None = None


def startup_trials(n_trials: int) -> int:
    """Random trials before the sampler's model takes over: a third of the budget, between 2 and 10."""
    return max(2, min(10, n_trials // 3))


def make_sampler(name: str, seed: int, n_startup: int) -> optuna.samplers.BaseSampler:
    """Optuna's *name* sampler (one of ``SAMPLERS``) after *n_startup* random trials."""
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup, multivariate=True)
    raise XferkitError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.")


def epoch_pruner(name: str, max_epochs: int) -> optuna.pruners.BasePruner:
    """Optuna's *name* pruner (``halving`` or ``hyperband``), an epoch being a unit of resource.

    Halving's rungs are at ``max_epochs / 27``, ``/ 9`` and ``/ 3`` epochs: a trial goes on past a rung
    only while its validation NLL there is in the best third of the trials that got there. Hyperband
    spreads the trials over brackets of halving whose first rung is each of these in turn (the last
    bracket prunes nothing), so a slow starter is not judged by its first epochs alone.
    """
    min_epochs = max(1, max_epochs // REDUCTION ** 3)
    if name == "halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=min_epochs, reduction_factor=REDUCTION)
    elif name == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=min_epochs, max_resource=max_epochs,
                                                reduction_factor=REDUCTION)
    else:
        raise XferkitError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}.")
    return EarlyRungs(pruner, max_epochs // REDUCTION)


class EarlyRungs(optuna.pruners.BasePruner):
    """*pruner*'s verdicts up to epoch *last*; a trial that got past it trains to the end.

    Rounding puts a rung of ``epoch_pruner`` near the end (7 x 27 = 189 of 200 epochs): pruning there saves
    a few epochs and throws away a trial nearly trained (bnn on sample_data: 5 of 24). Wrapped, Hyperband
    is also no ``HyperbandPruner`` to Optuna, whose samplers then learn from every trial, not only from
    those of the new trial's bracket (toy curves: 11 of 24 trials seen).
    """

    def __init__(self, pruner: optuna.pruners.BasePruner, last: int):
        self.pruner, self.last = pruner, last

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        return step is not None and step <= self.last and self.pruner.prune(study, trial)


def open_study(folder: Path, config: dict, seed: int = 0, n_startup: int = 10,
               pruner: optuna.pruners.BasePruner | None = None, sampler: str = "gp") -> optuna.Study:
    """The study journalled in *folder* (created if new); refuses a folder that tuned something else.

    *pruner* (none by default) may stop trials that report their epochs (it is not part of the study's
    record: a tune resumed with another pruner keeps its earlier trials). *sampler* (see ``SAMPLERS``) is
    recorded when the study is created, and a resumed study goes on with the recorded one.
    """
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    journal = Path(folder) / JOURNAL
    if folder.exists() and any(folder.iterdir()) and not journal.is_file():
        raise XferkitError(f"{folder} exists and holds no {JOURNAL}: it is not a tune folder, and tune "
                           "writes only into a new one or its own. Choose another folder with -o.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _drop_torn_record(journal)
        storage = JournalStorage(JournalFileBackend(str(journal)))
        study = optuna.create_study(study_name=STUDY, storage=storage, direction="minimize",
                                    pruner=pruner or optuna.pruners.NopPruner(), load_if_exists=True)
    except OSError as err:
        raise write_error(journal, err) from None
    except (ValueError, KeyError, TypeError, AssertionError) as err:  # optuna on a damaged journal
        raise XferkitError(f"{journal} is damaged ({type(err).__name__}: {str(err)[:80]}); move it away to "
                           "start this tune afresh, or choose another folder with -o.") from None
    recorded = study.user_attrs.get("config")
    if recorded is None:
        study.set_user_attr("config", config)
    elif recorded != config:
        changed = sorted(k for k in set(recorded) | set(config) if recorded.get(k) != config.get(k))
        raise XferkitError(f"{folder} holds trials of a different tune (it differs in: "
                           f"{', '.join(changed)}). Use another -o folder, or delete {folder}.")
    if "sampler" not in study.user_attrs:
        make_sampler(sampler, seed, n_startup)  # an unknown name is refused before it is recorded
        study.set_user_attr("sampler", sampler)
    # seeded by the trials done, so a resumed run's random start-up trials do not repeat earlier ones
    study.sampler = make_sampler(study.user_attrs["sampler"], seed + len(finished_trials(study)), n_startup)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)  # killed mid-trial: it will be run again
    return study


def _drop_torn_record(journal: Path) -> None:
    """A run killed while writing leaves half a line at the journal's end: cut it (trials stay complete)."""
    if not journal.is_file():
        return
    data = journal.read_bytes()
    if data and not data.endswith(b"\n"):
        journal.write_bytes(data[:data.rfind(b"\n") + 1])


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count towards the budget: scored, pruned, or failed with a reason (not interrupted)."""
    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or "error" in t.user_attrs]


@dataclass
class LearningCurve:
    """One trial's ``epoch_end``: reports each epoch's validation NLL and asks the pruner whether to stop."""

    trial: optuna.Trial
    epochs: int | None = None
    pruned: bool = False

    def epoch_end(self, epoch: int, val_nll: float) -> bool:
        self.epochs = epoch
        self.trial.report(val_nll, epoch)
        self.pruned = self.trial.should_prune()
        return self.pruned


@dataclass(frozen=True)
class EpochBudget:
    """Epochs the trials of a pruned study may train in all, each trial at most *per_trial* of them."""

    total: int
    per_trial: int

    def spent(self, study: optuna.Study) -> int:
        """Epochs *study*'s finished trials trained; one that failed before its first epoch ended costs a
        full trial's (so that a study whose every trial fails still ends)."""
        return sum(t.user_attrs.get("epochs") or self.per_trial for t in finished_trials(study))

    def allows(self, spent: int) -> bool:
        """Whether a trial trained to the end would still fit in the budget after *spent* epochs."""
        return spent + self.per_trial <= self.total


def run_trials(study: optuna.Study, objective: Objective, search_space: Callable[..., dict],
               n_trials: int, description: str = "tuning", reporter: Reporter = SILENT,
               budget: EpochBudget | None = None) -> None:
    """Run trials until *n_trials* are finished (or, given an epoch *budget*, until the next trial might
    overrun it: as many trials as it holds); a trial whose fit raises is recorded as failed.

    A trial the study's pruner stops is recorded as pruned, with its scores where it stopped, and the
    sampler learns it as finished with that NLL: Optuna's GPSampler learns from finished trials only, and
    left blind to pruned ones it stays random while most trials are pruned (benchmarks/tune_pruning.py).
    Told instead a prediction of its final NLL (its last epoch's plus the median change from there among
    the trials trained to the end), the GP ended further from unpruned tuning's best (bnn, three seeds).
    """
    def done() -> int:  # in the unit of the progress shown: epochs given a budget, else trials
        return budget.spent(study) if budget else len(finished_trials(study))

    total, unit = (budget.total, "epoch") if budget else (n_trials, "trial")
    with reporter.task(description, total, unit=unit) as task:
        task.update(completed=min(done(), total), info=_best_info(study))
        while budget.allows(done()) if budget else done() < n_trials:
            trial = study.ask()
            params = search_space(trial)
            curve = LearningCurve(trial)
            start = time.perf_counter()
            try:
                nll, accuracy = objective(params, curve.epoch_end)
            except Exception as err:  # a bad configuration must not end the search
                trial.set_user_attr("error", f"{type(err).__name__}: {err}")
                _record_cost(trial, start, curve)
                study.tell(trial, state=TrialState.FAIL)
            except BaseException:
                study.tell(trial, state=TrialState.FAIL)  # interrupted: not counted, run again later
                raise
            else:
                trial.set_user_attr("accuracy", accuracy)
                trial.set_user_attr("val_nll", nll)
                trial.set_user_attr("pruned", curve.pruned)
                _record_cost(trial, start, curve)
                study.tell(trial, nll)  # a pruned trial too: the sampler learns where it stopped
            task.update(completed=min(done(), total), info=_best_info(study))


def _record_cost(trial: optuna.Trial, start: float, curve: LearningCurve) -> None:
    trial.set_user_attr("seconds", round(time.perf_counter() - start, 3))
    trial.set_user_attr("epochs", curve.epochs)


def _best_info(study: optuna.Study) -> str:
    best = best_record(trial_records(study))
    return f"best val_nll {best.val_nll:.4f} (trial {best.number})" if best else ""


def trial_records(study: optuna.Study) -> list[TrialRecord]:
    """The finished trials; a pruned one's NLL and accuracy are its model's where it was stopped."""
    return [_record(t) for t in finished_trials(study)]


def _record(trial: optuna.trial.FrozenTrial) -> TrialRecord:
    attrs = trial.user_attrs
    return TrialRecord(trial.number, trial.params, attrs.get("val_nll", trial.value), attrs.get("accuracy"),
                       attrs.get("seconds", 0.0), attrs.get("error"),
                       "pruned" if attrs.get("pruned") else trial.state.name.lower(),
                       attrs.get("epochs"))


def _scored(records: list[TrialRecord]) -> list[TrialRecord]:
    """Trials trained to the end and scored: a pruned trial's partial score is no candidate."""
    return [r for r in records if r.state == "complete" and r.val_nll is not None]


def best_record(records: list[TrialRecord]) -> TrialRecord | None:
    """Lowest validation NLL (to ``NLL_DECIMALS``), then highest validation accuracy."""
    return min(_scored(records), key=lambda r: (round(r.val_nll, NLL_DECIMALS), -r.val_accuracy),
               default=None)


def best_so_far(records: list[TrialRecord]) -> list[float]:
    """The best validation NLL after each scored trial, in trial order."""
    return np.minimum.accumulate([r.val_nll for r in _scored(records)]).tolist()


@dataclass
class TuneResult:
    head: str
    trials: list[TrialRecord]
    best: TrialRecord
    baseline: dict
    model_folder: Path
    test_metrics: dict
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"head": self.head, "baseline_default_params": self.baseline,
                "best": asdict(self.best), "model": str(self.model_folder),
                "test_metrics_after_refit": self.test_metrics, "notes": self.notes,
                "files": self.files, "trials": [asdict(r) for r in self.trials]}


def tune(data: str | Path, *, backbone: BackboneOptions | str = BackboneOptions(), head: str = "lr",
         output: str | Path = "runs/tuned", trials: int = 20, head_params: dict | None = None,
         val_split: float = SplitOptions.val_split, seed: int = SplitOptions.seed, calibrate: bool = True,
         pruner: str | None = PRUNER, sampler: str = "gp", options: ExtractOptions = ExtractOptions(),
         reporter: Reporter = SILENT) -> TuneResult:
    """Search *head*'s hyper-parameters on *data*'s validation split and save the refitted best.

    ``head_params`` are fixed for every trial (they are not searched). For heads that train by epochs
    (bnn, finetune, scratch), *pruner* (one of ``PRUNERS``; None: none) stops poor trials early, and the
    trials then train ``PRUNED_SHARE`` of *trials* x epochs in all, as many trials as that holds. *sampler*
    (one of ``SAMPLERS``) draws the trials of a new study; a resumed one keeps its own.
    """
    require_one_process("tune")
    backbone = BackboneOptions(backbone) if isinstance(backbone, str) else backbone
    output = Path(output)
    fixed = {k: v for k, v in (head_params or {}).items() if v is not None}
    space = getattr(head_class(head), "search_space", None)
    if space is None:
        raise XferkitError(f"the {head} head declares no search space, so it cannot be tuned.")
    splits = load_splits(data, val_split, seed)
    if splits.val is None or not len(splits.val):
        raise XferkitError("tune scores trials on a validation split: use --val-split > 0 "
                           "or give DATA a val/ folder.")
    for note in splits.notes:
        reporter.note(note)
    config = json.loads(json.dumps({"data": str(Path(data).resolve()), "backbone": asdict(backbone),
                                    "head": head, "fixed_params": fixed, "val_split": val_split,
                                    "seed": seed, "calibrate": calibrate}, default=str))
    declared = declared_params(head)  # a head that trains by epochs: each is a unit of the pruner's resource
    epochs = fixed.get("epochs", declared["epochs"].default) if "epochs" in declared else None
    pruned = bool(pruner and epochs)
    study = open_study(output, config, seed, startup_trials(trials), epoch_pruner(pruner, epochs) if pruned
                       else None, sampler)

    def fit(params: dict, fit_splits: Splits, folder: Path | None = None, run_reporter: Reporter = SILENT,
            folds: int = 0):
        return repurpose(data, backbone=backbone, head=head, params={**params, **fixed}, output=folder,
                         val_split=val_split, seed=seed, calibrate=calibrate, force=True, options=options,
                         splits=fit_splits, folds=folds, reporter=run_reporter).model

    if "baseline" not in study.user_attrs:  # the head's defaults: what tuning has to beat
        study.set_user_attr("baseline", fit({}, splits, run_reporter=reporter).metrics)

    def objective(params: dict, epoch_end: EpochEnd) -> tuple[float, float]:
        metrics = fit_model(head, {**params, **fixed}, backbone=backbone, train=splits.train, val=splits.val,
                            options=options, seed=seed, calibrated=calibrate,
                            epoch_end=epoch_end if epochs else None)[0].metrics
        return metrics["nll"], metrics["accuracy"]

    run_trials(study, objective, space, trials, f"tuning {head}", reporter,
               EpochBudget(int(trials * epochs * PRUNED_SHARE), epochs) if pruned else None)
    records = trial_records(study)
    best = best_record(records)
    if best is None:
        reasons = sorted({r.error for r in records if r.error})
        raise XferkitError(f"every trial failed; first reasons: {'; '.join(reasons[:3])}")
    if head_kind(head) == "features":  # cross-fitting keeps what calibrates the refitted model held out
        refit, folds = Splits(merge(splits.train, splits.val), None, splits.test), REFIT_FOLDS
        notes = [f"best trial refitted on train+val ({len(refit.train)} images); its temperature, prediction "
                 f"sets and OOD threshold come from {REFIT_FOLDS}-fold cross-fitting"]
    else:  # a pixel trainer is too costly to fit once per fold: its validation split stays held out
        refit, folds = splits, 0
        notes = ["best trial refitted on the training split; the validation split calibrates it"]
    model = fit(best.params, refit, output / "model", reporter, folds)
    test_metrics = evaluate(model, Path(data) / "test", options=options, reporter=reporter).metrics \
        if splits.test else {}
    if epochs:
        notes.append(epochs_note(records, trials, epochs, study.user_attrs["sampler"]))
        reporter.note(notes[-1])
    result = TuneResult(head, records, best, study.user_attrs["baseline"], output / "model",
                        test_metrics, splits.notes + notes)
    _write_outputs(result, output)
    return result


def epochs_note(records: list[TrialRecord], trials: int, max_epochs: int, sampler: str) -> str:
    """How many trials were pruned, and what share of *trials* unpruned trials' epochs they all trained."""
    ran = sum(r.epochs or 0 for r in records)
    pruned = sum(r.state == "pruned" for r in records)
    learned = f" (the {sampler} sampler learned each where it stopped)" if pruned else ""
    return (f"{pruned} of {len(records)} trials pruned{learned}; the trials trained {ran} epochs, "
            f"{ran / (trials * max_epochs):.0%} of {trials} x {max_epochs}")


def merge(a: LabelledImages, b: LabelledImages) -> LabelledImages:
    """Two labelled sets with the same classes as one."""
    return LabelledImages(a.paths + b.paths, np.concatenate([a.labels, b.labels]), a.classes)


def _write_outputs(result: TuneResult, folder: Path) -> None:
    """The trials table as CSV, the best-so-far plot and ``tune.json`` (which lists them all)."""
    from xferkit.api.plots import plot_best_so_far

    atomic_write_bytes(folder / "trials.csv", trials_csv(result.trials).encode())
    plot = plot_best_so_far(best_so_far(result.trials), result.baseline.get("nll"),
                            folder / "best_so_far.png")
    result.files = [str(folder / "trials.csv"), str(plot), str(folder / "tune.json")]
    write_json(folder / "tune.json", result.to_json())


def trials_csv(records: list[TrialRecord]) -> str:
    names = sorted({k for r in records for k in r.params})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", *names, "val_nll", "val_accuracy", "seconds", "state", "epochs", "error"])
    for r in records:
        writer.writerow([r.number, *(r.params.get(k) for k in names), r.val_nll, r.val_accuracy,
                         r.seconds, r.state, "" if r.epochs is None else r.epochs, r.error or ""])
    return buffer.getvalue()
