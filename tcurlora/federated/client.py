"""A federation's site (``tcurlora federated client``): one round's training, and the launcher of Flower's
SuperNode, whose ClientApp (:mod:`.client_app`) trains in every round."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from . import app_events_target, require_flower, round_path
from ..aggregate import read_adapter
from ..errors import TCURLoRAError
from ..events import Events
from ..protocol import check_adapter_path


def train_round(load_base, pairs: Sequence[Tuple[str, str]], out, server_round: int, train: dict, initial: dict,
                fingerprint: str, *, seed: int, device: str, events: Events) -> Tuple[dict, dict]:
    """One round at a site: ``finetune`` for the server's K steps from the global state; returns (manifest, state)."""
    from ..adapter import short_fingerprint
    from ..adapter_file import base_fingerprint
    from ..train import FinetuneOptions, finetune, checkpoint_path, curve_path

    base = load_base()  # fresh each round: finetune adapts the network in place
    if base_fingerprint(base.network) != fingerprint:
        raise TCURLoRAError(f"the server federates another base model ({short_fingerprint(fingerprint)}) than this site's "
                            f"'{base.name}' ({short_fingerprint(base_fingerprint(base.network))}); load the same base")
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


def run_client(pairs: List[Tuple[str, str]], *, base: str, weights: Optional[str], server: str, out,
               fold: Optional[int] = None, key: Optional[str] = None,
               root_cert: Optional[str], insecure: bool, seed: int, device: str, site: str, events: Events,
               events_file: Optional[str] = None, connect_timeout: float = 300.0) -> dict:
    """Join the federation at ``server`` as a Flower SuperNode until the server's last round is done.

    The SuperNode authenticates with the site's private ``key`` (its public half is on the server's list) and
    runs with ``--isolation process``: its tasks are started by :mod:`.site_exec`, which runs Flower's
    ClientApp process only for the federation's own app (pinned by hash) and refuses any other.  The site's
    inputs reach the ClientApp as the SuperNode's ``--node-config`` (a TOML file in a folder of this
    command's own, which is also Flower's ``FLWR_HOME``); the ClientApp reports the end of the federation (or
    its error) in a status file there."""
    require_flower()
    import sys

    import tomli_w

    from ..models import load_base
    from .checks import check_site_name
    from .keys import check_private_key
    from .processes import LOOPBACK, flower_command, free_port, split_address, start, stop, wait_closed
    from .site_exec import app_hash
    from .tls import read_root_certificate

    out = Path(out).absolute()
    check_adapter_path(out)
    if not pairs:
        raise TCURLoRAError("no training cases given (use --cases FOLDER or --image/--label)")
    check_site_name(site, "--site")
    if insecure:
        events.warning(f"INSECURE: --insecure given: this site's adapter updates travel to {server} unencrypted, "
                       "and the server is not authenticated; use --root-cert outside a test")
        tls = ["--insecure"]
        if key:
            raise TCURLoRAError("--key needs TLS (Flower authenticates sites over TLS only): drop --insecure")
    elif not root_cert:
        raise TCURLoRAError("give --root-cert CA.crt (the federation's CA certificate) or --insecure")
    elif not key:
        raise TCURLoRAError("give --key SITE.key (this site's key; `tcurlora federated keys` makes the pair, and its "
                            ".pub goes to the server's --site-keys) or --insecure")
    else:
        read_root_certificate(root_cert)
        tls = ["--root-certificates", str(Path(root_cert).absolute()),
               "--auth-supernode-private-key", str(check_private_key(key))]
    load_base(base, weights=weights, fold=fold)  # a base that does not load fails here, not in the first round
    with tempfile.TemporaryDirectory(prefix="tcurlora-supernode-") as home:
        home = Path(home)
        status = home / "status.json"
        node_config = home / "node_config.toml"
        node_config.write_text(tomli_w.dumps({
            "base": str(Path(base).absolute()) if Path(base).exists() else base, "weights": str(Path(weights).absolute()) if weights else "", "device": device,
            "fold": -1 if fold is None else int(fold),  # TOML has no null
            "cases": json.dumps([[str(Path(i).absolute()), str(Path(label).absolute())] for i, label in pairs]),
            "out": str(out), "site": site, "seed": seed, "events": app_events_target(events_file),
            "status": str(status)}))
        expected = app_hash()
        events.log(f"site {site}: joining the federation at {server} ({'no TLS' if insecure else 'TLS'}) with "
                   f"{len(pairs)} case(s); running only the federation's app {expected[:12]}")
        runtime = f"{LOOPBACK}:{free_port()}"
        supernode = start([flower_command("flower-supernode"), "--superlink", server, *tls,
                           "--node-config", str(node_config), "--isolation", "process",
                           "--host", LOOPBACK, "--port", runtime.rpartition(":")[2],
                           "--max-wait-time", str(connect_timeout)], home, "Flower's SuperNode")
        launcher = start([sys.executable, "-m", "tcurlora.federated.site_exec", "--runtime-api-address", runtime,
                          "--app-hash", expected], home, "the site's app launcher")
        try:
            while not status.exists():
                if supernode.poll() is not None:
                    raise TCURLoRAError(f"{server}: Flower's SuperNode stopped (exit status {supernode.returncode}) "
                                        "before the federation ended: server unreachable, TLS certificate not "
                                        "matching, this site's key not on the server's list, or the server "
                                        "stopped (Flower's log is above)")
                if launcher.poll() is not None:
                    raise TCURLoRAError(f"the site's app launcher stopped (exit status {launcher.returncode}; its "
                                        "log is above)")
                time.sleep(0.5)
            # the ClientApp wrote the status before its reply left: stop once the server has closed (it does
            # after every site's reply arrived), or after a grace period
            wait_closed(*split_address(server, "--server"), timeout=30.0)
        finally:
            stop(launcher)
            stop(supernode)
        done = json.loads(status.read_text(encoding="utf-8"))
    if "error" in done:
        raise TCURLoRAError(done["error"])
    return {"outputs": {"adapter": out, "rounds": done["rounds"]}, "metrics": {"rounds": len(done["rounds"])},
            "cancelled": False}
