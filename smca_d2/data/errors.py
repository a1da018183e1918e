"""The errors of dataset validation, and the format of their messages."""

from typing import Sequence

__all__ = ["DatasetNotFoundError", "DatasetValidationError", "format_problems"]

#: Problems listed in full in an error message; the rest are counted.
MAX_LISTED = 20


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not registered, or its json file / image folder does not exist."""


class DatasetValidationError(ValueError):
    """A dataset has problems that would make training fail or train on wrong data."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems)


def format_problems(header: str, problems: Sequence[str], footer: str = "") -> str:
    shown = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return f"{header}\n{shown}{more}" + (f"\n{footer}" if footer else "")
