"""Federated fine-tuning on Flower: sites train on their own cases, only adapter cores travel.

Each round the server sends the global adapter state to every site, each site runs K steps of the ordinary
``finetune`` from it on its own cases and sends its state back, and the server takes their case-weighted mean
(:func:`tcurlora.aggregate.weighted_mean`, the code ``tcurlora aggregate`` uses; exact for tCURLoRA because
Δ𝒲 is linear in the core).  The server accepts only checked updates whose base fingerprint and adapter layout
match its own (:mod:`.checks`, :func:`.server.accept_update`).  Unless ``--insecure`` is given, connections
use TLS and only the sites whose keys the server lists can join (:mod:`.keys`).

Transport: Flower's deployment engine.  The rounds are a Flower App (``flower_app/pyproject.toml``): a
``ServerApp`` (:mod:`.server_app`) and a ``ClientApp`` (:mod:`.client_app`) exchanging Flower ``Message``s
whose arrays are ``ArrayRecord``s (``.npy`` bytes, read by :func:`from_record`, never unpickled).
``tcurlora federated server`` starts a ``flower-superlink`` on loopback, the Fleet-only :mod:`.gateway` on
its address, and submits the app with ``flwr run``; ``tcurlora federated client`` starts a
``flower-supernode`` with the site's inputs as its ``--node-config`` and :mod:`.site_exec`, which runs the
federation's own ClientApp only (:mod:`.server`, :mod:`.client`).  Needs the ``federated`` extra:
``pip install "tcurlora[federated]"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional

from ..errors import TCURLoRAError
from ..manifest import _clip

if TYPE_CHECKING:
    import torch

# Flower reports usage to its own server unless told not to; a federation of hospitals must not phone home
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

#: the Flower App directory ``flwr run`` builds the bundle from (configuration only: the code is tcurlora's)
APP_DIR = Path(__file__).resolve().parent / "flower_app"


def require_flower():
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise TCURLoRAError('federated fine-tuning needs Flower: pip install "tcurlora[federated]"') from None


def to_record(state: Dict[str, torch.Tensor]):
    """Adapter state as a Flower ``ArrayRecord`` (tensor names kept, arrays as ``.npy`` bytes)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(t.detach().cpu().contiguous().numpy()) for k, t in state.items()})


def from_record(record, where: str, like: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Adapter state from an ``ArrayRecord`` sent by the other side.

    Each array is read from its ``.npy`` bytes by hand after checking its header: a plain numeric dtype, and
    exactly as many bytes as the declared shape needs (so nothing larger than what arrived is ever allocated;
    nothing is unpickled).  With ``like``, the tensor names (in order), shapes and dtypes must be ``like``'s.
    """
    import torch

    names = list(record.keys())
    if like is not None and names != list(like):
        raise TCURLoRAError(f"{where}: sent other adapter tensors than the federation's")
    return {name: torch.from_numpy(_npy_values(record[name], f"{where}: tensor {_clip(name)}",
                                               None if like is None else like[name]))
            for name in names}


def _npy_values(array, where: str, like: Optional[torch.Tensor]):
    import io

    import numpy as np
    import torch
    from numpy.lib import format as npy

    data = getattr(array, "data", None)
    if getattr(array, "stype", None) != "numpy.ndarray" or not isinstance(data, bytes):
        raise TCURLoRAError(f"{where} is not a NumPy array")
    stream = io.BytesIO(data)
    try:
        version = npy.read_magic(stream)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"format version {version}")
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream)
    except (ValueError, TypeError, SyntaxError, EOFError, OverflowError) as exc:
        raise TCURLoRAError(f"{where} is not a .npy array ({_clip(exc)})") from None
    if dtype.kind not in "biuf" or not dtype.isnative:
        raise TCURLoRAError(f"{where} has dtype {_clip(dtype)}, not a plain number type")
    count = 1
    for side in shape:
        count *= side
    held = len(data) - stream.tell()
    if held != count * dtype.itemsize:
        raise TCURLoRAError(f"{where} declares {dtype} {_clip(tuple(shape))} ({count * dtype.itemsize:,} "
                            f"bytes) but holds {held:,} bytes")
    if like is not None:
        expected = torch.empty(0, dtype=like.dtype).numpy().dtype
        if tuple(shape) != tuple(like.shape) or dtype != expected:
            raise TCURLoRAError(f"{where} is {dtype} {tuple(shape)}, the federation's is "
                                f"{expected} {tuple(like.shape)}")
    values = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return values.reshape(shape, order="F" if fortran_order else "C").copy(order="C")


def state_bytes(state: Dict[str, torch.Tensor]) -> int:
    """Bytes of tensor data one adapter state takes on the wire (one direction)."""
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def round_path(out, server_round: int) -> Path:
    """``global.safetensors`` -> ``global.round2.safetensors``, ``site.v1.safetensors`` ->
    ``site.v1.round2.safetensors`` (every round's state is kept for audit, each beside its own output)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.round{server_round}.safetensors")


def dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def write_json(path, value) -> None:
    from ..atomic import atomic_write_text

    atomic_write_text(path, json.dumps(value, indent=1))


def app_events(target: str):
    """Events of a ServerApp/ClientApp process: appended to the launcher's ``--events`` file, echoed to the
    console Flower captures."""
    import sys

    from ..events import Events

    return Events(open(target, "a", encoding="utf-8", buffering=1) if target else None, sys.stderr)


def app_events_target(events_file) -> str:
    """What a launcher's ``--events`` becomes for its app process: the same file (absolute), or "" for
    none or stdout (the app's events then reach the console through Flower's log)."""
    return "" if events_file in (None, "", "-") else str(Path(events_file).absolute())
