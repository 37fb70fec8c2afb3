"""No network while a base model from a file or folder is read and built.

Some network classes fetch weights when they are built (``pretrained=True``, a weights URL, a Hugging Face
repository name): a spec or bundle config naming one would make the engine reach the network at run time.
Those arguments are refused when a config is checked (:mod:`tcurlora.models.construct`); this guard covers
what such checks cannot know about: while :func:`no_network` is active in a thread, any attempt to resolve
a host name or open a connection from that thread is stopped before it starts, through Python's audit
hooks (``socket.getaddrinfo``, ``socket.connect``...), whatever library makes it.

Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Iterator, Union

from .errors import InputError

PathLike = Union[str, "os.PathLike[str]"]

_GUARDED_EVENTS = frozenset({"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                             "socket.connect", "socket.sendto", "socket.sendmsg", "urllib.Request",
                             "http.client.connect", "ftplib.connect", "smtplib.connect"})
_state = threading.local()
_installed = False
_install_lock = threading.Lock()


class NetworkRefused(InputError):
    """A base model tried to reach the network while it was read or built."""


def _audit(event: str, args) -> None:
    where = getattr(_state, "where", None)
    if where is not None and event in _GUARDED_EVENTS:
        raise NetworkRefused(where, "tried to reach the network while it was built (a download of pretrained "
                                    "weights?); tcurlora never downloads a base's weights: supply them as files")


def _install() -> None:
    global _installed
    with _install_lock:
        if not _installed:  # an audit hook cannot be removed: one for the process, inert outside no_network()
            sys.addaudithook(_audit)
            _installed = True


@contextlib.contextmanager
def no_network(where: PathLike) -> Iterator[None]:
    """Within the block, this thread cannot resolve host names or open connections; an attempt raises
    :class:`NetworkRefused` naming ``where`` (the spec, config or folder being read)."""
    _install()
    outer = getattr(_state, "where", None)
    _state.where = os.fspath(where)
    try:
        yield
    finally:
        _state.where = outer
