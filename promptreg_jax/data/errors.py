"""The one exception the data pipeline raises for bad input."""

from __future__ import annotations

import os


class DataError(ValueError):
    """A problem with input data, as one line: ``<file>: <problem>``.

    Every reader and preprocessing step raises this for bad input (missing file, wrong layout,
    corrupt volume, bad labels), naming the file or folder at fault, so a user can fix it without
    reading a traceback.
    """

    def __init__(self, path, problem: str):
        self.path = os.fspath(path) if path is not None else ""
        self.problem = " ".join(str(problem).split())  # one line, whatever the cause text holds
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)
