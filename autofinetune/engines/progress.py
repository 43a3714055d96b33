"""Progress on the terminal: a bar of trials (done/total, best so far, ETA) and of epochs.

Bars come from ``tqdm.auto``: widgets in a notebook, text on stderr in a terminal. With ``-q``
(:func:`autofinetune.logs.is_quiet`) there are neither bars nor trial lines.
"""

from __future__ import annotations

import math
import sys
from typing import Mapping

from autofinetune.logs import is_quiet


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (``tqdm.auto`` then draws widgets)."""
    shell = sys.modules.get("IPython")
    try:
        return shell is not None and type(shell.get_ipython()).__name__ == "ZMQInteractiveShell"
    except Exception:  # an IPython without a running shell
        return False


def progress_wanted(requested: bool | None) -> bool:
    """Whether to draw progress bars: as asked, else on a terminal or in a notebook (never with ``-q``)."""
    if is_quiet():
        return False
    return requested if requested is not None else (sys.stderr.isatty() or in_notebook())


def _finished_and_best(study) -> tuple[int, float | None]:
    from optuna.trial import TrialState

    from autofinetune.store.study import retried_trial_numbers

    trials = study.get_trials(deepcopy=False)
    retried = retried_trial_numbers(trials)
    finished = [
        t for t in trials if t.state.is_finished() and not (t.state == TrialState.FAIL and t.number in retried)
    ]
    # The main metric's: a trial's only value, or its first of several.
    values = [t.values[0] for t in trials if t.state == TrialState.COMPLETE and t.values]
    best = None
    if values:
        best = max(values) if study.directions[0].name == "MAXIMIZE" else min(values)
    return len(finished), best


class TrialProgressBar:
    """Bars for one foreground worker; when disabled, one log line per finished trial.

    Args:
        study: The study (read for the finished count and best value).
        n_trials: The study's trial budget.
        enabled: Draw bars (a terminal, one worker) or only print lines; neither with ``-q``.
    """

    def __init__(self, study, n_trials: int, *, enabled: bool) -> None:
        self.study = study
        self.quiet = is_quiet()
        self.enabled = enabled and not self.quiet
        self.trials_bar = None
        self.epochs_bar = None
        if self.enabled:
            from tqdm.auto import tqdm

            finished, best = _finished_and_best(study)
            self.trials_bar = tqdm(total=n_trials, initial=finished, desc="trials", unit="trial", position=0, file=sys.stderr)
            self._show_best(best)

    def _show_best(self, best: float | None) -> None:
        if self.trials_bar is not None and best is not None:
            self.trials_bar.set_postfix_str(f"best={best:.4g}")

    def start_trial(self, number: int, total_epochs: int) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            self.epochs_bar = tqdm(
                total=total_epochs, desc=f"trial {number}", unit="epoch", position=1, leave=False, file=sys.stderr
            )

    def epoch_done(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.epochs_bar is not None:
            shown = {k: f"{v:.3g}" for k, v in metrics.items() if k.startswith("val_") and math.isfinite(v)}
            self.epochs_bar.set_postfix(shown, refresh=False)
            self.epochs_bar.update(1)

    def trial_done(self, number: int, state: str, value: float | None, error: str | None) -> None:
        if self.epochs_bar is not None:
            self.epochs_bar.close()
            self.epochs_bar = None
        line = f"trial {number} {state}"
        if value is not None:
            line += f": best {value:.4g}"
        if error:
            line += f" ({error})"
        if self.trials_bar is not None:
            self.trials_bar.write(line, file=sys.stderr)
        elif not self.quiet:
            print(line, flush=True)

    def refresh(self) -> None:
        if self.trials_bar is not None:
            finished, best = _finished_and_best(self.study)
            self.trials_bar.n = min(finished, self.trials_bar.total)
            self._show_best(best)
            self.trials_bar.refresh()

    def close(self) -> None:
        for bar in (self.epochs_bar, self.trials_bar):
            if bar is not None:
                bar.close()


class StudyProgressMonitor:
    """A trials bar (done/total, best so far, ETA) for a launch whose trials run elsewhere (worker
    processes, Ray actors), refreshed from what they record in the study database.

    Args:
        study: The study.
        n_trials: Its trial budget.
        enabled: Draw the bar (``tqdm.auto``: a widget in a notebook); else lines are printed.
    """

    def __init__(self, study, n_trials: int, *, enabled: bool) -> None:
        self.study = study
        self.bar = None
        if enabled and not is_quiet():
            from tqdm.auto import tqdm

            # Trials finished before this launch start the bar: its rate (and ETA) counts only
            # the trials this launch runs.
            finished, _ = _finished_and_best(study)
            self.bar = tqdm(total=n_trials, initial=min(finished, n_trials), desc="trials", unit="trial", file=sys.stderr)
            self.poll()

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, flush=True)

    def poll(self) -> None:
        if self.bar is None:
            return
        finished, best = _finished_and_best(self.study)
        self.bar.n = min(finished, self.bar.total)
        if best is not None:
            self.bar.set_postfix_str(f"best={best:.4g}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
