"""A federation's site: trains on its own cases, sends back only adapter state (``tcurlora federated client``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from . import dumps, from_arrays, require_flower, round_path, to_arrays
from ..aggregate import read_adapter
from ..errors import TCURLoRAError
from ..events import Events


def train_round(load_base, pairs: Sequence[Tuple[str, str]], out, server_round: int, train: dict, initial: dict,
                fingerprint: str, *, seed: int, device: str, events: Events) -> Tuple[dict, dict]:
    """One round at a site: ``finetune`` for the server's K steps from the global state; returns (manifest, state)."""
    from ..adapter_file import base_fingerprint
    from ..train import FinetuneOptions, finetune, checkpoint_path, curve_path

    base = load_base()  # fresh each round: finetune adapts the network in place
    if base_fingerprint(base.network) != fingerprint:
        raise TCURLoRAError(f"the server federates another base model ({fingerprint[7:19]}) than this site's "
                            f"'{base.name}' ({base_fingerprint(base.network)[7:19]}); load the same base")
    patch = train.get("patch_size")
    options = FinetuneOptions(method=train["method"], rank=int(train["rank"]), preset=train["preset"],
                              train_modules=list(train["train_modules"]), steps=int(train["steps"]), lr=train["lr"],
                              batch_size=int(train["batch_size"]), patch_size=tuple(patch) if patch else None,
                              seed=seed * 1000 + server_round, device=device)
    path = round_path(out, server_round)
    finetune(base, pairs, path, labels=train["labels"], options=options, events=events, initial_state=initial)
    for extra in (checkpoint_path(path), curve_path(path)):  # a round is not resumed and has no curve worth keeping
        extra.unlink(missing_ok=True)
    return read_adapter(path)


def run_client(load_base, pairs: List[Tuple[str, str]], *, server: str, out, root_cert: Optional[str],
               insecure: bool, seed: int, device: str, site: str, events: Events,
               connect_timeout: float = 120.0) -> dict:
    require_flower()
    from flwr.client import NumPyClient
    from flwr.compat.client.app import start_client

    from .tls import read_root_certificate

    out = Path(out)
    if out.suffix != ".safetensors":
        raise TCURLoRAError(f"{out.name}: the adapter file must end in .safetensors")
    if not pairs:
        raise TCURLoRAError("no training cases given (use --cases FOLDER or --image/--label)")
    if insecure:
        events.warning(f"INSECURE: --insecure given: this site's adapter updates travel to {server} unencrypted, "
                       "and the server is not authenticated; use --root-cert outside a test")
        root = None
    elif not root_cert:
        raise TCURLoRAError("give --root-cert CA.crt (the federation's CA certificate) or --insecure")
    else:
        root = read_root_certificate(root_cert)
    done = {"rounds": [], "global": None}

    class Site(NumPyClient):
        def fit(self, parameters, config):
            server_round = int(config["round"])
            keys = json.loads(str(config["keys"]))
            initial = from_arrays(parameters, keys, "the server's global adapter")
            events.log(f"round {server_round}/{config['rounds']}: training on {len(pairs)} case(s)")
            manifest, state = train_round(load_base, pairs, out, server_round, json.loads(str(config["train"])),
                                          initial, str(config["fingerprint"]), seed=seed, device=device,
                                          events=events)
            if list(state) != keys:
                raise TCURLoRAError("this site's adapter has other tensors than the server's")
            done["rounds"].append(str(round_path(out, server_round)))
            done["manifest"] = manifest
            return to_arrays(state, keys), len(pairs), {"manifest": dumps(manifest), "keys": dumps(keys), "site": site}

        def evaluate(self, parameters, config):
            """The server's new global adapter after a round: kept as this site's result."""
            keys = json.loads(str(config["keys"]))
            done["global"] = (int(config["round"]), from_arrays(parameters, keys, "the server's global adapter"))
            return 0.0, len(pairs), {}

    def client_fn(context):
        return Site().to_client()

    import grpc

    deadline = time.monotonic() + connect_timeout
    while True:  # the server may not be listening yet: retry the first connection until the deadline
        try:
            start_client(server_address=server, client_fn=client_fn, root_certificates=root, insecure=insecure)
            break
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if done["rounds"] or code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                details = exc.details() if hasattr(exc, "details") else ""
                raise TCURLoRAError(f"{server}: the federation connection failed "
                                    f"({code.name if code else exc}: {details})") from None
            time.sleep(1.0)
    if not done["rounds"]:
        raise TCURLoRAError(f"{server}: no round completed (server unreachable, refused the connection, "
                            "or the TLS certificate does not match)")
    if done["global"] is None or done["global"][0] != len(done["rounds"]):
        raise TCURLoRAError(f"{server}: the federation ended before sending the global adapter of the last round")
    from ..aggregate import write_adapter_tensors

    # this site's manifest (same layout as the global one: the server checked it) with the global state
    provenance = {**done["manifest"]["provenance"], "federated_rounds": done["global"][0], "cases": None,
                  "site_cases": len(pairs)}
    manifest = dict(done["manifest"], provenance=provenance)
    write_adapter_tensors(out, manifest, done["global"][1])
    return {"outputs": {"adapter": out, "rounds": done["rounds"]}, "metrics": {"rounds": len(done["rounds"])},
            "cancelled": False}
