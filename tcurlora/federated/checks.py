"""What the server and the sites check in what the other side sends: site names, training settings, case counts.

Each check raises :class:`~tcurlora.errors.TCURLoRAError` with one line naming the sender (``where``); the
server drops the site that sent it from the round, a site stops with it.  Regular expressions go through
:func:`tcurlora.manifest.check_pattern`, the check adapter files get.
"""

from __future__ import annotations

import re
from typing import Optional

from .. import protocol
from ..errors import TCURLoRAError
from ..manifest import _clip

#: training settings the server decides for every site (a site cannot train another layout)
TRAIN_KEYS = ("method", "rank", "preset", "train_modules", "steps", "lr", "batch_size", "patch_size", "labels")
#: a case count above this weighs as this much (``--max-site-cases``): one site's self-reported count must
#: not make its update the whole global state
DEFAULT_MAX_SITE_CASES = 1000
MAX_SITE_NAME = 64
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def site_name_problem(name) -> Optional[str]:
    """Why ``name`` cannot name a site in logs and adapter provenance, or None."""
    if not isinstance(name, str) or not _SITE_NAME.fullmatch(name) or len(name) > MAX_SITE_NAME:
        shown = _clip(repr(name) if isinstance(name, str) else type(name).__name__, 40)
        size = f" ({len(name):,} characters)" if isinstance(name, str) and len(name) > MAX_SITE_NAME else ""
        return (f"site name {shown}{size} is not a plain name (at most {MAX_SITE_NAME} letters, digits, '.', '_' "
                "or '-', starting with a letter or digit)")
    return None


def check_site_name(name, where: str) -> str:
    problem = site_name_problem(name)
    if problem:
        raise TCURLoRAError(f"{where}: {problem}")
    return name


def check_train_settings(train, where: str) -> dict:
    """The server's training settings, checked as a job's are (:mod:`tcurlora.protocol`), the method one that
    averages, and every ``train_modules`` expression as an adapter file's; returns them normalised."""
    from ..manifest import check_pattern

    if not isinstance(train, dict) or set(train) != set(TRAIN_KEYS):
        raise TCURLoRAError(f"{where}: the training settings must be exactly {', '.join(TRAIN_KEYS)}")
    try:
        checked = protocol.validate_settings(train, TRAIN_KEYS)
    except protocol.SettingError as exc:
        raise TCURLoRAError(f"{where}: training setting {exc}") from None
    check_averageable(checked["method"], where)
    for pattern in checked["train_modules"]:
        problem = check_pattern(pattern)
        if problem:
            raise TCURLoRAError(f"{where}: train_modules: {problem}")
    return checked


def check_averageable(method: str, where: str) -> None:
    """Refuse a method whose trained state does not average to the mean update (LoRA's factors)."""
    from ..aggregate import AVERAGEABLE, LORA_REFUSAL

    if method not in AVERAGEABLE:
        raise TCURLoRAError(f"{where}: " + (LORA_REFUSAL if method == "lora" else
                                            f"method {method!r} cannot be federated ({', '.join(AVERAGEABLE)} can)"))


def case_weight(cases, max_cases: int, where: str) -> int:
    """A site's weight: its reported case count (a positive integer), at most ``max_cases``."""
    if isinstance(cases, bool) or not isinstance(cases, int) or cases < 1:
        raise TCURLoRAError(f"{where}: reports no training cases")
    return min(cases, max_cases)
