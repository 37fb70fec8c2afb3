"""The federation's server: R rounds of exact FedAvg over adapter cores (``tcurlora federated server``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Optional

import torch

from . import dumps, from_arrays, require_flower, round_path, state_bytes, to_arrays
from ..aggregate import (AVERAGEABLE, LORA_REFUSAL, check_like, first_difference, merged_manifest, read_adapter,
                         weighted_mean, write_adapter_tensors)
from ..errors import TCURLoRAError
from ..events import Events
from ..manifest import parse_manifest
from ..tuners.model import first_non_finite

log = logging.getLogger("tcurlora.federated")

# training settings the server decides for every site (a site cannot train another layout)
TRAIN_KEYS = ("method", "rank", "preset", "train_modules", "steps", "lr", "batch_size", "patch_size", "labels")


def initial_adapter(base, options, labels, out) -> Path:
    """The round-0 global adapter: a fresh adapter on ``base`` as ``finetune`` would build it, saved beside ``out``."""
    from ..adapter import inject_adapter
    from ..adapter_file import save_adapter
    from ..train import _seed_everything, build_adapter_config, resolve_labels

    if options.method not in AVERAGEABLE:
        raise TCURLoRAError(LORA_REFUSAL if options.method == "lora"
                            else f"method {options.method!r} cannot be federated")
    table = resolve_labels(base, labels, None)
    config = build_adapter_config(base, options, table)
    _seed_everything(options.seed)  # as finetune does: a new head starts from the seed
    inject_adapter(base.network, config, "finetune")
    path = round_path(out, 0)
    save_adapter(base.network, path, labels=table, preprocessing=base.preprocessing.to_dict(),
                 provenance={"cases": None, "federated_rounds": 0}, base_name=base.name)
    return path


def check_update(reference: dict, reference_state: Dict[str, torch.Tensor], manifest_text: str,
                 state: Dict[str, torch.Tensor], where: str) -> None:
    """Refuse (TCURLoRAError naming ``where``) an update trained on another base or layout, or not finite."""
    manifest = parse_manifest(manifest_text, where)
    if manifest["base"]["fingerprint"] != reference["base"]["fingerprint"]:
        raise TCURLoRAError(f"{where}: trained on another base model ({manifest['base']['fingerprint'][7:19]}, "
                            f"the federation's is {reference['base']['fingerprint'][7:19]})")
    problem = first_difference(reference, manifest)
    if problem:
        raise TCURLoRAError(f"{where}: adapter layout differs: {problem}")
    check_like(state, reference_state, where, "expected")
    bad = first_non_finite(state)
    if bad is not None:
        raise TCURLoRAError(f"{where}: tensor {bad} has non-finite values")


def make_strategy(manifest: dict, state: Dict[str, torch.Tensor], train: dict, rounds: int, min_clients: int,
                  out, events: Events):
    from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import Strategy

    keys = list(state)

    class CoreAveraging(Strategy):
        """FedAvg over adapter state, weighted by each site's case count, checked against the server's layout."""

        def __init__(self) -> None:
            self.manifest, self.state, self.history = manifest, state, []

        def initialize_parameters(self, client_manager):
            return ndarrays_to_parameters(to_arrays(self.state, keys))

        def configure_fit(self, server_round, parameters, client_manager):
            clients = client_manager.sample(num_clients=min_clients, min_num_clients=min_clients)
            config = {"round": server_round, "rounds": rounds, "keys": dumps(keys),
                      "fingerprint": self.manifest["base"]["fingerprint"], "train": dumps(train)}
            events.log(f"round {server_round}/{rounds}: sending the global adapter "
                       f"({state_bytes(self.state):,} bytes) to {len(clients)} site(s)")
            return [(c, FitIns(parameters, config)) for c in clients]

        def aggregate_fit(self, server_round, results, failures):
            states, weights, names, manifests = [], [], [], []
            for proxy, res in results:
                site = str(res.metrics.get("site") or proxy.cid)
                try:
                    update = from_arrays(parameters_to_ndarrays(res.parameters), keys, f"site {site}")
                    if json.loads(str(res.metrics.get("keys", "[]"))) != keys:
                        raise TCURLoRAError(f"site {site}: sent other adapter tensors than the federation's")
                    manifest_text = str(res.metrics.get("manifest", ""))
                    check_update(self.manifest, self.state, manifest_text, update, f"site {site}")
                    if not (isinstance(res.num_examples, int) and res.num_examples > 0):
                        raise TCURLoRAError(f"site {site}: reports no training cases")
                except (TCURLoRAError, ValueError) as exc:
                    events.warning(f"round {server_round}: update refused: {exc}")
                    continue
                states.append(update)
                weights.append(res.num_examples)
                names.append(site)
                manifests.append(json.loads(str(res.metrics["manifest"])))
            for failure in failures:
                what = repr(failure) if isinstance(failure, BaseException) else f"status {failure[1].status}"
                events.warning(f"round {server_round}: a site failed ({what})")
            if not states:
                raise TCURLoRAError(f"round {server_round}: no acceptable update from any site")
            self.state = weighted_mean(states, weights, names)
            path = round_path(out, server_round)
            merged = merged_manifest(manifests, weights, names, self.state, rounds=server_round)
            write_adapter_tensors(path, merged, self.state)
            sent = state_bytes(self.state)
            record = {"round": server_round, "sites": names, "weights": weights, "adapter": str(path),
                      "bytes_per_site_each_way": sent}
            self.history.append(record)
            events.log(f"round {server_round}/{rounds}: averaged {len(states)} site(s) "
                       f"({', '.join(f'{n} x{w}' for n, w in zip(names, weights))}) -> {path.name}")
            return ndarrays_to_parameters(to_arrays(self.state, keys)), {"sites": len(states)}

        def configure_evaluate(self, server_round, parameters, client_manager):
            # not an evaluation: hands every site the new global adapter, which each keeps as its result
            clients = client_manager.sample(num_clients=min_clients, min_num_clients=min_clients)
            config = {"round": server_round, "keys": dumps(keys), "global": dumps(self.history[-1]["adapter"])}
            return [(c, EvaluateIns(parameters, config)) for c in clients]

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return CoreAveraging()


def run_server(base, options, *, labels, address: str, rounds: int, min_clients: int, out,
               tls_dir: Optional[str], insecure: bool, events: Events) -> dict:
    """Serve ``rounds`` rounds to ``min_clients`` sites; write every round's global adapter and ``out``."""
    require_flower()
    from flwr.server import ServerConfig, start_server

    from .tls import server_credentials

    out = Path(out)
    if out.suffix != ".safetensors":
        raise TCURLoRAError(f"{out.name}: the global adapter must end in .safetensors")
    if rounds < 1 or min_clients < 1:
        raise TCURLoRAError("--rounds and --min-clients must be at least 1")
    if insecure:
        events.warning("INSECURE: --insecure given: adapter updates travel unencrypted and any host that reaches "
                       f"{address} can join; use TLS (--tls-dir) outside a test")
        certificates = None
    elif not tls_dir:
        raise TCURLoRAError("give --tls-dir DIR (ca.crt, server.pem, server.key; `tcurlora federated certs` makes a "
                            "self-signed set) or --insecure")
    else:
        certificates = server_credentials(tls_dir)
    manifest, state = read_adapter(initial_adapter(base, options, labels, out))
    train = {k: getattr(options, k) for k in TRAIN_KEYS if k != "labels"}
    train["patch_size"] = list(train["patch_size"]) if train["patch_size"] else None
    train["labels"] = manifest["labels"]
    strategy = make_strategy(manifest, state, train, rounds, min_clients, out, events)
    events.log(f"federation on {address} ({'TLS' if certificates else 'no TLS'}): {rounds} round(s) of "
               f"{options.steps} local step(s), {min_clients} site(s), {manifest['method']['name']} "
               f"rank {options.rank}, {state_bytes(state):,} bytes per site each way per round")
    start_server(server_address=address, config=ServerConfig(num_rounds=rounds), strategy=strategy,
                 certificates=certificates)
    if len(strategy.history) != rounds:
        raise TCURLoRAError(f"the federation ended after {len(strategy.history)} of {rounds} round(s)")
    final, final_state = read_adapter(strategy.history[-1]["adapter"])
    write_adapter_tensors(out, final, final_state)
    return {"outputs": {"adapter": out, "rounds": [r["adapter"] for r in strategy.history]},
            "metrics": {"rounds": strategy.history}, "cancelled": False}
