"""Hydra's Optuna sweeper, made to continue a killed search: `hydra/sweeper=optuna_cpu` (or any
sweeper config whose _target_ is ResumableOptunaSweeper) keeps its study in SQLite in the sweep
directory; relaunching the same command runs only the trials that are not finished yet.

Hydra imports every plugin module at start-up, so this one imports nothing heavy: optuna loads
when a search starts. Without the optuna extra installed there is nothing to register.
"""

from __future__ import annotations

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # pip install "resnet-train[optuna]" provides it
    OptunaSweeper = None  # type: ignore[assignment,misc]


if OptunaSweeper is not None:

    class ResumableOptunaSweeper(OptunaSweeper):
        """OptunaSweeper whose sweep() first settles the study left by an earlier launch of the
        same search (resnet_train.search.continue_study)."""

        def sweep(self, arguments: list[str]) -> None:
            from resnet_train.search import continue_study

            if continue_study(self.sweeper) == 0:
                return
            try:
                super().sweep(arguments)
            except ValueError as e:
                from resnet_train.cli import FAILED_JOBS

                # Every trial failed, so Optuna has no best one to report: each failure was
                # reported as it happened, and the command ends with status 2 after this.
                if not FAILED_JOBS or "Record does not exist" not in str(e):
                    raise
