"""The federation's server (``tcurlora federated server``): the checks of a site's reply, the round-0 adapter,
and the launcher of Flower's SuperLink (on loopback), of the site keys' registration, of the Fleet-only
:mod:`.gateway` and of ``flwr run`` for the app whose ServerApp (:mod:`.server_app`) runs the rounds."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from . import APP_DIR, app_events_target, dumps, from_record, require_flower, round_path, state_bytes
from .checks import (DEFAULT_MAX_SITE_CASES, TRAIN_KEYS, case_weight, check_averageable, check_train_settings,
                     site_name_problem)
from ..adapter import short_fingerprint
from ..aggregate import check_like, first_difference, read_adapter
from ..errors import TCURLoRAError
from ..events import Events
from ..manifest import _clip, parse_manifest
from ..protocol import check_adapter_path
from ..tuners.model import first_non_finite


def initial_adapter(base, options, labels, out) -> Path:
    """The round-0 global adapter: a fresh adapter on ``base`` as ``finetune`` would build it, saved beside ``out``."""
    from ..adapter import inject_adapter
    from ..adapter_file import save_adapter
    from ..train import build_adapter_config, resolve_labels, seed_everything, split_ignore

    check_averageable(options.method, "--method")
    table, _ = split_ignore(resolve_labels(base, labels, None))  # the classes ('ignore' is not one)
    config = build_adapter_config(base, options, table)
    seed_everything(options.seed)  # as finetune does: a new head starts from the seed
    inject_adapter(base.network, config, "finetune")
    path = round_path(out, 0)
    save_adapter(base.network, path, labels=table, preprocessing=base.preprocessing.to_dict(),
                 provenance={"cases": None, "federated_rounds": 0}, base_name=base.name)
    return path


def check_manifest(reference: dict, manifest_text: str, where: str) -> dict:
    """Refuse (TCURLoRAError naming ``where``) an update's manifest of another base or layout."""
    manifest = parse_manifest(manifest_text, where)
    if manifest["base"]["fingerprint"] != reference["base"]["fingerprint"]:
        raise TCURLoRAError(f"{where}: trained on another base model ({short_fingerprint(manifest['base']['fingerprint'])}, "
                            f"the federation's is {short_fingerprint(reference['base']['fingerprint'])})")
    problem = first_difference(reference, manifest)
    if problem:
        raise TCURLoRAError(f"{where}: adapter layout differs: {problem}")
    return manifest


def check_update(reference: dict, reference_state: Dict[str, torch.Tensor], manifest_text: str,
                 state: Dict[str, torch.Tensor], where: str) -> None:
    """Refuse (TCURLoRAError naming ``where``) an update trained on another base or layout, or not finite."""
    check_manifest(reference, manifest_text, where)
    check_state(state, reference_state, where)


def check_state(state: Dict[str, torch.Tensor], reference_state: Dict[str, torch.Tensor], where: str) -> None:
    check_like(state, reference_state, where, "expected")
    bad = first_non_finite(state)
    if bad is not None:
        raise TCURLoRAError(f"{where}: tensor {bad} has non-finite values")


def accept_update(reference: dict, reference_state: Dict[str, torch.Tensor], content, node: int,
                  registered: Optional[str] = None, max_cases: int = DEFAULT_MAX_SITE_CASES):
    """A site's reply (a Flower ``RecordDict``) as (site name, state, cases reported, weight), or TCURLoRAError
    naming the site when it is not an update of the federation's adapter.

    The site's name is ``registered`` (the name its key was listed under) when there is one, else the name
    the site reports, which must be a plain name.  Its arrays, manifest and case count are checked before any
    of them is used; its weight is the case count it reports, at most ``max_cases``.
    """
    meta, record = content.config_records.get("meta"), content.array_records.get("update")
    metrics = content.metric_records.get("metrics")
    site = registered or f"(node {node})"
    if record is None or meta is None or metrics is None or not isinstance(meta.get("manifest"), str):
        raise TCURLoRAError(f"site {site}: the reply is not an adapter update")
    problem = site_name_problem(meta.get("site"))
    if problem:
        raise TCURLoRAError(f"site {site}: {problem}")
    site = registered or meta["site"]
    where = f"site {site}"
    check_manifest(reference, meta["manifest"], where)  # first: it names a layout difference best
    state = from_record(record, where, like=reference_state)
    check_state(state, reference_state, where)
    cases = metrics.get("num-examples")
    return site, state, cases, case_weight(cases, max_cases, where)


def register_sites(keys: Dict[str, Path], home) -> Dict[str, str]:
    """Register each site's public key with the SuperLink (``flwr supernode register``, over the loopback
    connection in ``home``); returns {node id: site name}."""
    import subprocess

    from .processes import flower_command, flower_env

    sites = {}
    for name, key in keys.items():
        done = subprocess.run([flower_command("flwr"), "supernode", "register", str(key), "--name", name,
                               "--format", "json"], env=flower_env(home), cwd=home, capture_output=True, text=True,
                              timeout=120)
        try:
            answer = json.loads(done.stdout)
        except ValueError:
            answer = {}
        if not (isinstance(answer, dict) and answer.get("success") and answer.get("node-id")):
            why = answer.get("error-message") if isinstance(answer, dict) else None
            raise TCURLoRAError(f"{key.name}: Flower did not register this site key "
                                f"({_clip(why or done.stderr or done.stdout, 200)})")
        sites[str(answer["node-id"])] = name
    return sites


def run_server(base, options, *, labels, address: str, rounds: int, min_clients: int, out,
               tls_dir: Optional[str], insecure: bool, site_keys: Sequence = (),
               max_site_cases: int = DEFAULT_MAX_SITE_CASES, events: Events, events_file: Optional[str] = None) -> dict:
    """Serve ``rounds`` rounds to ``min_clients`` sites; write every round's global adapter and ``out``.

    Starts ``flower-superlink`` on 127.0.0.1 only (TLS with ``tls_dir``'s certificates and Flower's SuperNode
    authentication), registers the sites' public keys (``site_keys``), opens :mod:`.gateway` (the Fleet API
    alone) on ``address``, submits the Flower App with ``flwr run`` over loopback (run config: the rounds, the
    round-0 adapter, the training settings, the registered sites) and waits for the run to end; the ServerApp
    writes the adapters and a summary, which becomes this command's result.  ``events_file``: the
    ``--events`` file, which the ServerApp appends its round events to."""
    require_flower()
    import sys

    import tomli_w

    from .keys import site_public_keys
    from .processes import LOOPBACK, flower_command, free_port, split_address, start, stop, wait_listening
    from .site_exec import app_hash
    from .tls import server_certificate_files

    out = Path(out).absolute()
    check_adapter_path(out, "global adapter")
    if rounds < 1 or min_clients < 1 or max_site_cases < 1:
        raise TCURLoRAError("--rounds, --min-clients and --max-site-cases must be at least 1")
    host, port = split_address(address, "--address")
    train = {k: getattr(options, k) for k in TRAIN_KEYS if k != "labels"}
    train["patch_size"] = list(train["patch_size"]) if train["patch_size"] else None
    train["labels"] = None
    check_train_settings(train, "the federation's settings")  # what every site will check, checked first
    keys: Dict[str, Path] = {}
    if insecure:
        if site_keys:
            raise TCURLoRAError("--site-keys needs TLS (Flower authenticates sites over TLS only): drop --insecure")
        events.warning("INSECURE: --insecure given: adapter updates travel unencrypted and any host that reaches "
                       f"{address} can join as a site; use TLS (--tls-dir) and --site-keys outside a test")
        tls = None
    elif not tls_dir:
        raise TCURLoRAError("give --tls-dir DIR (ca.crt, server.pem, server.key; `tcurlora federated certs` makes a "
                            "self-signed set) or --insecure")
    elif not site_keys:
        raise TCURLoRAError("give --site-keys SITE.pub... (the public keys of the sites this federation admits; each "
                            "site makes its pair with `tcurlora federated keys`) or --insecure")
    else:
        tls = server_certificate_files(tls_dir)
        keys = site_public_keys(site_keys)
    manifest, state = read_adapter(initial_adapter(base, options, labels, out))
    train["labels"] = manifest["labels"]
    events.log(f"federation on {address} ({'TLS' if tls else 'no TLS'}): {rounds} round(s) of "
               f"{options.steps} local step(s), {min_clients} site(s), {manifest['method']['name']} "
               f"rank {options.rank}, {state_bytes(state):,} bytes per site each way per round; training settings "
               f"for every site: {dumps({k: v for k, v in train.items() if k != 'labels'})}")
    with tempfile.TemporaryDirectory(prefix="tcurlora-superlink-") as home:
        home = Path(home)
        internal = free_port()
        # the SuperLink connection `flwr run` and `flwr supernode register` use: the SuperLink this command
        # starts, on loopback only (its own processes connect there too, so a certificate must name 127.0.0.1)
        connection = {"address": f"{LOOPBACK}:{internal}"}
        connection.update({"root-certificates": str(tls["ca"])} if tls else {"insecure": True})
        (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "tcurlora",
                                                                       "tcurlora": connection}}))
        summary = home / "summary.json"
        flags = ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]),
                 "--ssl-keyfile", str(tls["key"]), "--enable-supernode-auth"] if tls else ["--insecure"]
        superlink = start([flower_command("flower-superlink"), "--host", LOOPBACK, "--port", str(internal), *flags,
                           "--disable-runtime-dependency-installation"], home, "Flower's SuperLink")
        gateway = run = None
        try:
            wait_listening(LOOPBACK, internal, superlink, 60, "Flower's SuperLink")
            sites = register_sites(keys, home)
            run_config = home / "run_config.toml"
            run_config.write_text(tomli_w.dumps({
                "rounds": rounds, "min-clients": min_clients, "initial": str(round_path(out, 0)), "out": str(out),
                "train": dumps(train), "sites": dumps(sites), "max-site-cases": max_site_cases,
                "events": app_events_target(events_file), "summary": str(summary)}))
            gateway = start([sys.executable, "-m", "tcurlora.federated.gateway", "--listen", address, "--superlink",
                             f"{LOOPBACK}:{internal}",
                             *(["--tls-dir", str(tls["ca"].parent)] if tls else ["--insecure"])], home,
                            "the federation's gateway")
            wait_listening(LOOPBACK if host in ("0.0.0.0", "::", "localhost") else host, port, gateway, 60,
                           "the federation's gateway")
            events.log(f"sites connect to {address} (Flower's Fleet API only); the SuperLink's Control and Runtime "
                       f"APIs listen on {LOOPBACK}:{internal} only; "
                       + (f"{len(sites)} site key(s) registered: {', '.join(sites.values())}" if tls else
                          "any SuperNode may join (no TLS, no site keys)")
                       + f"; sites run only app {app_hash()[:12]}")
            # `--stream` shows the ServerApp's log here and returns when the run has ended
            run = start([flower_command("flwr"), "run", str(APP_DIR), "tcurlora", "--run-config", str(run_config),
                         "--stream"], home, "flwr run")
            run.wait()
        finally:
            for proc in (run, gateway, superlink):
                if proc is not None:
                    stop(proc)
        if not summary.exists():
            raise TCURLoRAError("the federation run ended without a result (Flower's log is above)")
        result = json.loads(summary.read_text(encoding="utf-8"))
    if "error" in result:
        raise TCURLoRAError(result["error"])
    history = result["rounds"]
    if len(history) != rounds:
        raise TCURLoRAError(f"the federation ended after {len(history)} of {rounds} round(s)")
    return {"outputs": {"adapter": out, "rounds": [r["adapter"] for r in history]},
            "metrics": {"rounds": history, "train": train}, "cancelled": False}
