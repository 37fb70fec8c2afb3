"""Federated fine-tuning on Flower: sites train on their own cases, only adapter cores travel.

``tcurlora federated server`` runs R rounds of FedAvg over the adapter state: each round it sends the global
cores to every site, each site runs K steps of the ordinary ``finetune`` from them on its own cases and sends
its cores back, and the server takes their case-weighted mean (:func:`tcurlora.aggregate.weighted_mean`, the
code ``tcurlora aggregate`` uses; exact for tCURLoRA because Δ𝒲 is linear in the core).  The server accepts
only updates whose base fingerprint and adapter layout match its own.  Connections use TLS unless
``--insecure`` is given.

Transport: Flower's gRPC server and client (``flwr.compat``), arrays as ``.npy`` bytes (never pickled).
Needs the ``federated`` extra: ``pip install "tcurlora[federated]"``.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np
import torch

from ..errors import TCURLoRAError

# Flower reports usage to its own server unless told not to; a federation of hospitals must not phone home
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def require_flower():
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise TCURLoRAError('federated fine-tuning needs Flower: pip install "tcurlora[federated]"') from None


def to_arrays(state: Dict[str, torch.Tensor], keys: List[str]) -> List[np.ndarray]:
    return [state[k].detach().cpu().contiguous().numpy() for k in keys]


def from_arrays(arrays: List[np.ndarray], keys: List[str], where: str) -> Dict[str, torch.Tensor]:
    if len(arrays) != len(keys):
        raise TCURLoRAError(f"{where}: {len(arrays)} arrays for {len(keys)} adapter tensors")
    return {k: torch.from_numpy(np.array(a, copy=True)) for k, a in zip(keys, arrays)}


def state_bytes(state: Dict[str, torch.Tensor]) -> int:
    """Bytes of tensor data one adapter state takes on the wire (one direction)."""
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def round_path(out, server_round: int):
    """``global.safetensors`` -> ``global.round2.safetensors`` (every round's state is kept for audit)."""
    from pathlib import Path

    out = Path(out)
    return out.with_name(f"{out.name.split('.')[0]}.round{server_round}.safetensors")


def dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"))
