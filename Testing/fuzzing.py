"""What the seeded fuzz tests share (adapter files, base models): one mutation of a JSON tree, and the run.

A mutation picks a place in the tree and replaces its value with a nasty one, deletes it, duplicates it,
changes a number, or wraps it. The run makes and checks cases until the count or the time budget is reached,
each under an alarm, and records every exception that escapes a check as a failure naming the seed and case.
The random draws depend only on the seed, so a failure replays.
"""

from __future__ import annotations

import collections
import copy
import random
import resource
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Counter, List, Sequence, Tuple

OPS = ("nasty", "nasty", "delete", "duplicate", "numeric", "wrap")


def _numbers(n):
    return [n + 1, n - 1, n * 1000, -n, n * 1.5, 2 ** 31 - 1]


def _wrap(rng, value):
    return [value] if rng.random() < 0.5 else {"value": value}


def paths(node, prefix=()):
    """Every place in ``node``, as a tuple of keys and indices (``()`` is the root)."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, prefix + (i,))


def get(node, path):
    for key in path:
        node = node[key]
    return node


def mutate(rng, tree, nasty: Sequence[Any], focus: Sequence[Any] = (), ops: Sequence[str] = OPS,
           numbers: Callable[[Any], list] = _numbers, wrap: Callable[[Any, Any], Any] = _wrap) -> None:
    """One change at a random place of ``tree`` (under ``focus`` four times in five, when given)."""
    places = [p for p in paths(tree) if p]
    focused = [p for p in places if p[:len(focus)] == tuple(focus)] if focus else []
    path = rng.choice(focused if focused and rng.random() < 0.8 else places)
    parent, key, node = get(tree, path[:-1]), path[-1], get(tree, path)
    op = rng.choice(ops)
    if op == "nasty":
        parent[key] = copy.deepcopy(rng.choice(nasty))
    elif op == "delete":
        del parent[key]
    elif op == "duplicate":
        if isinstance(parent, list):
            parent.append(copy.deepcopy(node))
        else:
            parent[f"{key}_"] = copy.deepcopy(node)
    elif op == "numeric" and isinstance(node, (int, float)) and not isinstance(node, bool):
        parent[key] = rng.choice(numbers(node))
    else:
        parent[key] = wrap(rng, node)


class Hang(Exception):
    pass


@dataclass
class FuzzRun:
    """What :func:`run` saw: ``counts[(kind, outcome)]``, ``failures`` (one text each), the seconds it took and
    how much the process's peak memory grew (bytes)."""

    counts: Counter = field(default_factory=collections.Counter)
    failures: List[str] = field(default_factory=list)
    seconds: float = 0.0
    rss_growth: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values()) + len(self.failures)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(seed: int, cases: int, budget_s: float, timeout_s: int,
        make_case: Callable[[random.Random], Tuple[str, Callable[[], str]]]) -> FuzzRun:
    """``make_case(rng)`` gives ``(kind, check)`` for each case; ``check()`` runs under an alarm of ``timeout_s``
    and returns its outcome. Stops after ``cases`` cases or ``budget_s`` seconds."""
    hung = []

    def hang(signum, frame):
        hung.append(index)
        raise Hang(f"a case ran longer than {timeout_s} s")

    rng = random.Random(seed)
    result = FuzzRun()
    rss0 = _peak_rss()
    previous = signal.signal(signal.SIGALRM, hang)
    t0 = time.monotonic()
    try:
        for index in range(cases):
            if time.monotonic() - t0 > budget_s:
                break
            kind, check = make_case(rng)
            signal.alarm(timeout_s)
            try:
                outcome = check()
                if hung and hung[-1] == index:  # the alarm's exception was swallowed (raised in a gc callback)
                    raise Hang(f"a case ran longer than {timeout_s} s")
                result.counts[(kind, outcome)] += 1
            except BaseException as exc:  # noqa: B902 - every escape is a finding, reported by the test
                if isinstance(exc, KeyboardInterrupt):
                    raise
                result.failures.append(f"seed {seed} case {index} ({kind}): {type(exc).__name__}: "
                                       + "".join(traceback.format_exception_only(type(exc), exc)).strip()[:300]
                                       + "\n" + "".join(traceback.format_tb(exc.__traceback__)[-4:]))
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    result.seconds = time.monotonic() - t0
    result.rss_growth = _peak_rss() - rss0
    return result
