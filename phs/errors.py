"""User-facing errors: a message that names the file or case and the problem."""

from __future__ import annotations


class PhsError(Exception):
    """An error caused by the user's input or configuration (exit code 2, no traceback)."""


class DataError(PhsError):
    """A dataset, case or file cannot be used."""

    def __init__(self, problem: str, case: str | None = None) -> None:
        self.case = case
        self.problem = problem
        super().__init__(f"case {case}: {problem}" if case else problem)

    def __reduce__(self):  # keep case and problem across process pools
        return (type(self), (self.problem, self.case))
