"""Hyperparameter searches with Optuna that survive being killed.

Hydra's Optuna sweeper runs `n_trials` new trials at every launch and leaves the trials of a
killed launch RUNNING forever. `continue_study` runs before each launch (from the sweeper in
hydra_plugins/resnet_train_optuna) and makes a relaunch of the same command continue instead:

- the SQLite file's folder (the sweep directory) is created, so the study can be opened;
- a trial still RUNNING was killed with its launch: it is marked FAIL (and "killed") and its
  parameters are queued to be tried first, so its job lands in the same run directory and (with
  resume=auto, which the search configs set) continues from its last checkpoint;
- only n_trials minus the finished trials are run (complete, pruned, or failed by their own run:
  a diverged or refused job); a fresh sampler seed keeps a relaunch from drawing the parameters
  of the earlier launch again.

`read_trials` gives resnet-train-report the study's trials.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SQLITE = "sqlite:///"
# The study's file in a sweep directory (configs/hydra/sweeper/optuna_cpu.yaml).
STUDY_FILE = "optuna.db"


KILLED = "killed"  # the user attribute of a trial killed with its search (run again)


def continue_study(impl: Any) -> int:
    """Settle the study of a search about to (re)start; return how many trials it still has
    to run (impl.n_trials is set to that). `impl` is the Optuna sweeper's OptunaSweeperImpl."""
    import optuna
    from optuna.trial import TrialState

    storage = impl.storage
    if not storage:
        return impl.n_trials
    if str(storage).startswith(SQLITE):
        Path(str(storage)[len(SQLITE) :]).parent.mkdir(parents=True, exist_ok=True)
    try:
        study = optuna.load_study(study_name=impl.study_name, storage=storage)
    except KeyError:  # a new study
        return impl.n_trials
    trials = study.get_trials(deepcopy=False)
    # A trial whose run failed (it diverged, or a value was refused) is finished: its outcome is
    # known. One killed with the search is not: it is marked, and runs again first.
    finished = sum(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and not t.user_attrs.get(KILLED))
        for t in trials
    )
    killed = [t for t in trials if t.state == TrialState.RUNNING]
    for trial in killed:
        optuna.trial.Trial(study, trial._trial_id).set_user_attr(KILLED, True)
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params)
    if trials and hasattr(impl.sampler, "reseed_rng"):
        impl.sampler.reseed_rng()
    wanted = impl.n_trials
    impl.n_trials = max(0, wanted - finished)
    log.info(
        "continuing study %s (%s): %d trials finished, %d killed run again first, %d to run",
        study.study_name,
        storage,
        finished,
        len(killed),
        impl.n_trials,
    )
    if impl.n_trials == 0:
        failed = sum(t.state == TrialState.FAIL and not t.user_attrs.get(KILLED) for t in trials)
        log.warning(
            "nothing to run: study %s has its %d trials%s; hydra.sweeper.n_trials=%d runs %d more "
            "in it, or a new name= starts a new search",
            study.study_name,
            finished,
            f" ({failed} of them failed: a relaunch does not run them again)" if failed else "",
            finished + wanted,
            wanted,
        )
    return impl.n_trials


@dataclass
class Trial:
    number: int
    state: str  # COMPLETE, FAIL, RUNNING, WAITING, PRUNED
    params: dict[str, Any]
    value: float | None


def read_trials(sweep: Path) -> list[Trial] | None:
    """The trials of the Optuna study in sweep/optuna.db, or None if the sweep has none."""
    path = sweep / STUDY_FILE
    if not path.is_file():
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"{SQLITE}{path}"
    studies = optuna.get_all_study_summaries(storage)
    trials = []
    for summary in studies:
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        for t in study.get_trials(deepcopy=False):
            trials.append(Trial(t.number, t.state.name, dict(t.params), t.value))
    return trials
