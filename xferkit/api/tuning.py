"""Bayesian optimisation of a head's hyper-parameters (Optuna's GP sampler), resumable from disk.

Each trial fits the head on the training split with parameters drawn from the head's
``search_space`` and scores it by validation NLL (accuracy breaks ties). Trials are journalled
to ``trials.journal`` in the output folder, so an interrupted run continues where it stopped.
The best configuration is refitted on train + validation and saved as a normal model.
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
from xferkit.core.errors import XferkitError
from xferkit.core.reporting import SILENT, Reporter
from xferkit.io.data import LabelledImages, Splits, load_splits
from xferkit.io.files import atomic_write_bytes, write_error
from xferkit.model.options import BackboneOptions, ExtractOptions, SplitOptions
from xferkit.model.registry import head_class

JOURNAL = "trials.journal"
STUDY = "xferkit-tune"
#: Validation NLL is compared to this many decimals before accuracy breaks a tie.
NLL_DECIMALS = 4

#: ``objective(params) -> (validation NLL, validation accuracy)``
Objective = Callable[[dict], tuple[float, float]]


@dataclass
class TrialRecord:
    """One finished trial as the trials table shows it."""

    number: int
    params: dict
    val_nll: float | None
    val_accuracy: float | None
    seconds: float
    error: str | None = None


def startup_trials(n_trials: int) -> int:
    """Random trials before the GP takes over: a third of the budget, between 2 and 10."""
    return max(2, min(10, n_trials // 3))


def open_study(folder: Path, config: dict, seed: int = 0, n_startup: int = 10) -> optuna.Study:
    """The study journalled in *folder* (created if new); refuses a folder that tuned something else."""
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
                                    load_if_exists=True)
    except OSError as err:
        raise write_error(journal, err) from None
    except (ValueError, KeyError, TypeError, AssertionError) as err:  # optuna on a damaged journal
        raise XferkitError(f"{journal} is damaged ({type(err).__name__}: {str(err)[:80]}); move it away to "
                           "start this tune afresh, or choose another folder with -o.") from None
    # seeded by the trials done, so a resumed run's random start-up trials do not repeat earlier ones
    study.sampler = optuna.samplers.GPSampler(seed=seed + len(finished_trials(study)),
                                              n_startup_trials=n_startup)
    recorded = study.user_attrs.get("config")
    if recorded is None:
        study.set_user_attr("config", config)
    elif recorded != config:
        changed = sorted(k for k in set(recorded) | set(config) if recorded.get(k) != config.get(k))
        raise XferkitError(f"{folder} holds trials of a different tune (it differs in: "
                           f"{', '.join(changed)}). Use another -o folder, or delete {folder}.")
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
    """Trials that count towards the budget: scored, or failed with a reason (not interrupted)."""
    return [t for t in study.get_trials(deepcopy=False)
            if t.state == TrialState.COMPLETE or "error" in t.user_attrs]


def run_trials(study: optuna.Study, objective: Objective, search_space: Callable[..., dict],
               n_trials: int, description: str = "tuning", reporter: Reporter = SILENT) -> None:
    """Run trials until *n_trials* are finished; a trial whose fit raises is recorded as failed."""
    done = len(finished_trials(study))
    with reporter.task(description, n_trials, unit="trial") as task:
        task.advance(min(done, n_trials), info=_best_info(study))
        for _ in range(max(0, n_trials - done)):
            trial = study.ask()
            params = search_space(trial)
            start = time.perf_counter()
            try:
                nll, accuracy = objective(params)
            except Exception as err:  # a bad configuration must not end the search
                trial.set_user_attr("error", f"{type(err).__name__}: {err}")
                trial.set_user_attr("seconds", round(time.perf_counter() - start, 3))
                study.tell(trial, state=TrialState.FAIL)
            except BaseException:
                study.tell(trial, state=TrialState.FAIL)  # interrupted: not counted, run again later
                raise
            else:
                trial.set_user_attr("accuracy", accuracy)
                trial.set_user_attr("seconds", round(time.perf_counter() - start, 3))
                study.tell(trial, nll)
            task.advance(info=_best_info(study))


def _best_info(study: optuna.Study) -> str:
    best = best_record(trial_records(study))
    return f"best val_nll {best.val_nll:.4f} (trial {best.number})" if best else ""


def trial_records(study: optuna.Study) -> list[TrialRecord]:
    return [TrialRecord(t.number, t.params, t.value, t.user_attrs.get("accuracy"),
                        t.user_attrs.get("seconds", 0.0), t.user_attrs.get("error"))
            for t in finished_trials(study)]


def best_record(records: list[TrialRecord]) -> TrialRecord | None:
    """Lowest validation NLL (to ``NLL_DECIMALS``), then highest validation accuracy."""
    scored = [r for r in records if r.val_nll is not None]
    return min(scored, key=lambda r: (round(r.val_nll, NLL_DECIMALS), -r.val_accuracy),
               default=None)


def best_so_far(records: list[TrialRecord]) -> list[float]:
    """The best validation NLL after each scored trial, in trial order."""
    return np.minimum.accumulate([r.val_nll for r in records if r.val_nll is not None]).tolist()


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
         options: ExtractOptions = ExtractOptions(), reporter: Reporter = SILENT) -> TuneResult:
    """Search *head*'s hyper-parameters on *data*'s validation split and save the refitted best.

    ``head_params`` are fixed for every trial (they are not searched).
    """
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
    study = open_study(output, config, seed, startup_trials(trials))

    def fit(params: dict, fit_splits: Splits, folder: Path | None = None, run_reporter: Reporter = SILENT):
        return repurpose(data, backbone=backbone, head=head, params={**params, **fixed}, output=folder,
                         val_split=val_split, seed=seed, calibrate=calibrate, force=True, options=options,
                         splits=fit_splits, reporter=run_reporter).model

    if "baseline" not in study.user_attrs:  # the head's defaults: what tuning has to beat
        study.set_user_attr("baseline", fit({}, splits, run_reporter=reporter).metrics)

    def objective(params: dict) -> tuple[float, float]:
        metrics = fit(params, splits).metrics
        return metrics["nll"], metrics["accuracy"]

    run_trials(study, objective, space, trials, f"tuning {head}", reporter)
    records = trial_records(study)
    best = best_record(records)
    if best is None:
        reasons = sorted({r.error for r in records if r.error})
        raise XferkitError(f"every trial failed; first reasons: {'; '.join(reasons[:3])}")
    both = Splits(merge(splits.train, splits.val), None, splits.test)
    model = fit(best.params, both, output / "model", reporter)
    test_metrics = evaluate(model, Path(data) / "test", options=options, reporter=reporter).metrics \
        if splits.test else {}
    result = TuneResult(head, records, best, study.user_attrs["baseline"], output / "model",
                        test_metrics, splits.notes + [f"best trial refitted on train+val "
                                                      f"({len(both.train)} images)"])
    _write_outputs(result, output)
    return result


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
    writer.writerow(["trial", *names, "val_nll", "val_accuracy", "seconds", "error"])
    for r in records:
        writer.writerow([r.number, *(r.params.get(k) for k in names), r.val_nll, r.val_accuracy,
                         r.seconds, r.error or ""])
    return buffer.getvalue()
