"""Exceptions that reach the user.

The CLI and the worker catch :class:`TCURLoRAError`, print ``error: <message>`` (no traceback) and exit with
status 2, so every message must be complete and readable on its own, on one line.
"""

from __future__ import annotations

import os
import unicodedata
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


# Characters that change what a terminal or a text header shows beyond the character itself: controls
# (newline, ESC...), lone surrogates (unprintable), line/paragraph separators and bidirectional overrides.
_BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def unsafe_character(text: str) -> Optional[str]:
    """The first character of ``text`` that must not reach a terminal or a file header, as ``U+XXXX``; None if clean."""
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or ch in _BIDI_CONTROLS:
            return f"U+{ord(ch):04X}"
    return None


def one_line(text: str) -> str:
    """``text`` on one line with every character that could drive a terminal shown as ``?``: what may be
    printed of a name or value from a file or folder someone else made."""
    # The worker protocol sends one JSON object per line and the CLI prints one line: no embedded newlines,
    # and nothing (a file name, a value from a crafted file) that could drive the terminal.
    text = " ".join(str(text).split())
    return "".join("?" if unsafe_character(ch) else ch for ch in text) if unsafe_character(text) else text


def shown(value) -> str:
    """A value as a message quotes it: its ``repr``, shortened to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def display_name(path: PathLike) -> str:
    """Short name of a file for messages: its base name (a folder keeps its name too)."""
    text = os.fspath(path).rstrip("/\\")
    return os.path.basename(text) or text


class TCURLoRAError(Exception):
    """Base of all errors meant for the user (bad input, bad configuration, incompatible adapter...)."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))

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
            self.problem = one_line(os.fspath(path_or_message))
            super().__init__(self.problem)
        else:
            self.path = os.fspath(path_or_message)
            self.problem = one_line(problem)
            super().__init__(f"{display_name(self.path)}: {self.problem}")
