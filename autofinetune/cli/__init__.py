"""The ``autofinetune`` command line: the group (:mod:`autofinetune.cli.main`), the commands that
run trials (:mod:`~autofinetune.cli.search_commands`) and those that read a study
(:mod:`~autofinetune.cli.study_commands`)."""

from autofinetune.cli import search_commands, study_commands  # noqa: F401  (they add their commands)
from autofinetune.cli.main import hoist_group_options, main

__all__ = ["hoist_group_options", "main"]
