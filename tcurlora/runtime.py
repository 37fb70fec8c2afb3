"""What training and inference share at run time: the device, the stop watch (stop file, SIGINT/SIGTERM),
the CUDA out-of-memory fallback and the sliding-window predictor."""

from __future__ import annotations

import os
import signal
from typing import Callable, Optional, TypeVar

import torch

from .errors import TCURLoRAError
from .events import Events
from .protocol import DEVICES

T = TypeVar("T")


def pick_device(name: str) -> torch.device:
    """``auto`` (a CUDA GPU when there is one), ``cpu`` or ``cuda``."""
    if name not in DEVICES:
        raise TCURLoRAError(f"unknown device {name!r} (use {', '.join(DEVICES)})")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TCURLoRAError("--device cuda: no CUDA GPU is available to this torch build")
    return torch.device(name)


class StopWatch:
    """Polls a stop file and catches SIGINT/SIGTERM; restores the old handlers afterwards.

    The first signal asks for a clean stop at the next poll. A second one means that stop was not reached
    (a read that blocks, a long step): the old handlers are restored and the signal delivered again, so
    Ctrl-C twice or a second SIGTERM ends the process as it would without the watch, never only kill -9.
    """

    def __init__(self, stop_file: Optional[str]) -> None:
        self.stop_file = stop_file
        self.signalled = False
        self._old = {}

    def __enter__(self) -> "StopWatch":
        def handler(signum, frame):
            if self.signalled:
                self._restore()
                signal.raise_signal(signum)
                return
            self.signalled = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. called from a GUI thread): stop file only
                pass
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        while self._old:
            sig, old = self._old.popitem()
            signal.signal(sig, old)

    def requested(self) -> bool:
        return self.signalled or bool(self.stop_file and os.path.exists(self.stop_file))


def with_oom_fallback(attempt: Callable[[], T], shrink: Callable[[], Optional[str]], to_cpu: Callable[[], None],
                      events: Events, what: str = "the smallest setting") -> T:
    """``attempt()``; on CUDA out-of-memory free the cache and ``shrink()`` (it returns the warning to show,
    or None when nothing is left to shrink: then ``to_cpu()``), and try again. Each fallback is a warning."""
    while True:
        try:
            return attempt()
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            message = shrink()
            if message is None:
                to_cpu()
                message = f"out of GPU memory at {what}: continuing on the CPU (slower)"
            events.warning(message)


class InferenceStopped(Exception):
    """A stop was requested between two sliding windows."""


def sliding_window_probabilities(network, image: torch.Tensor, roi, device, amp: bool, sw_batch_size: int = 1,
                                 overlap: float = 0.25, tta: bool = False,
                                 stop: Optional[Callable[[], bool]] = None, mode: str = "gaussian") -> torch.Tensor:
    """Softmax probabilities [C, D, H, W] of a model-space image (MONAI sliding window, optional flip TTA).

    ``stop`` is asked before every window batch; when it returns True, :class:`InferenceStopped` is raised
    (a large volume with a small window can take minutes, and a cancel should not wait for all of it).
    ``mode``: how overlapping windows blend (MONAI's ``constant`` or ``gaussian``).
    """
    from monai.inferers import sliding_window_inference

    predictor = network
    if stop is not None:
        def predictor(window):
            if stop():
                raise InferenceStopped()
            return network(window)

    x = image[None].to(device)
    roi = [min(int(r), int(s)) if int(s) >= int(r) else int(r) for r, s in zip(roi, x.shape[2:])]
    flips = [()] + ([(2,), (3,), (4,)] if tta else [])
    total = None
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for dims in flips:
            xi = torch.flip(x, dims) if dims else x
            logits = sliding_window_inference(xi, roi, sw_batch_size, predictor, overlap=overlap, mode=mode)
            p = torch.softmax(logits.float(), 1)
            p = torch.flip(p, dims) if dims else p
            total = p if total is None else total + p
    return (total / len(flips))[0].cpu()
