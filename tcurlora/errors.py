"""Exceptions that reach the user.

The CLI and the worker catch :class:`TCURLoRAError`, print ``error: <message>`` (no traceback) and exit with
status 2, so every message must be complete and readable on its own, on one line.
"""

from __future__ import annotations

import os
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


def _one_line(text: str) -> str:
    # The worker protocol sends one JSON object per line and the CLI prints one line: no embedded newlines.
    return " ".join(str(text).split())


def display_name(path: PathLike) -> str:
    """Short name of a file for messages: its base name (a folder keeps its name too)."""
    text = os.fspath(path).rstrip("/\\")
    return os.path.basename(text) or text


class TCURLoRAError(Exception):
    """Base of all errors meant for the user (bad input, bad configuration, incompatible adapter...)."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InputError(TCURLoRAError):
    """A user-supplied file (image, label, segmentation, case folder) is missing or unusable.

    The message always names the file and the problem on one line, for example
    ``label.nii.gz: geometry does not match image.nii.gz (size 64x64x40 vs 64x64x41)``.

    ``InputError(path, problem)`` builds that message from a path and a problem;
    ``InputError(message)`` takes a ready message (which must then name the file itself).
    """

    def __init__(self, path_or_message: PathLike, problem: Optional[str] = None) -> None:
        if problem is None:
            self.path: Optional[str] = None
            self.problem = _one_line(os.fspath(path_or_message))
            super().__init__(self.problem)
        else:
            self.path = os.fspath(path_or_message)
            self.problem = _one_line(problem)
            super().__init__(f"{display_name(self.path)}: {self.problem}")
