"""The federation's server (``tcurlora federated server``): checks, the round-0 adapter, and the launcher of
Flower's SuperLink and of ``flwr run`` for the app whose ServerApp (:mod:`.server_app`) runs the rounds."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch

from . import APP_DIR, app_events_target, dumps, from_record, require_flower, round_path, state_bytes
from ..aggregate import AVERAGEABLE, LORA_REFUSAL, check_like, first_difference, read_adapter
from ..errors import TCURLoRAError
from ..events import Events
from ..manifest import parse_manifest
from ..protocol import check_adapter_path
from ..tuners.model import first_non_finite

# training settings the server decides for every site (a site cannot train another layout)
TRAIN_KEYS = ("method", "rank", "preset", "train_modules", "steps", "lr", "batch_size", "patch_size", "labels")


def initial_adapter(base, options, labels, out) -> Path:
    """The round-0 global adapter: a fresh adapter on ``base`` as ``finetune`` would build it, saved beside ``out``."""
    from ..adapter import inject_adapter
    from ..adapter_file import save_adapter
    from ..train import build_adapter_config, resolve_labels, seed_everything, split_ignore

    if options.method not in AVERAGEABLE:
        raise TCURLoRAError(LORA_REFUSAL if options.method == "lora"
                            else f"method {options.method!r} cannot be federated")
    table, _ = split_ignore(resolve_labels(base, labels, None))  # the classes ('ignore' is not one)
    config = build_adapter_config(base, options, table)
    seed_everything(options.seed)  # as finetune does: a new head starts from the seed
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


def accept_update(reference: dict, reference_state: Dict[str, torch.Tensor], content, node: int):
    """A site's reply (a Flower ``RecordDict``) as (site name, state, manifest, case count), or TCURLoRAError
    naming the site when it is not an update of the federation's adapter."""
    meta = content.config_records.get("meta")
    site = str(meta.get("site") or "") if meta is not None else ""
    where = f"site {site or f'(node {node})'}"
    record, metrics = content.array_records.get("update"), content.metric_records.get("metrics")
    if record is None or meta is None or metrics is None or not isinstance(meta.get("manifest"), str):
        raise TCURLoRAError(f"{where}: the reply is not an adapter update")
    if list(record.keys()) != list(reference_state):
        raise TCURLoRAError(f"{where}: sent other adapter tensors than the federation's")
    state = from_record(record, where)
    check_update(reference, reference_state, meta["manifest"], state, where)
    cases = metrics.get("num-examples")
    if not (isinstance(cases, int) and cases > 0):
        raise TCURLoRAError(f"{where}: reports no training cases")
    return site or f"node {node}", state, json.loads(meta["manifest"]), cases


def run_server(base, options, *, labels, address: str, rounds: int, min_clients: int, out,
               tls_dir: Optional[str], insecure: bool, events: Events, events_file: Optional[str] = None) -> dict:
    """Serve ``rounds`` rounds to ``min_clients`` sites; write every round's global adapter and ``out``.

    Starts ``flower-superlink`` on ``address`` (TLS with ``tls_dir``'s certificates), submits the Flower App
    with ``flwr run`` (run config: the rounds, the round-0 adapter, the training settings) and waits for the
    run to end; the ServerApp writes the adapters and a summary, which becomes this command's result.
    ``events_file``: the ``--events`` file, which the ServerApp appends its round events to."""
    require_flower()
    import tomli_w

    from .processes import LOOPBACK, flower_command, split_address, start, stop, wait_listening
    from .tls import server_certificate_files

    out = Path(out).absolute()
    check_adapter_path(out, "global adapter")
    if rounds < 1 or min_clients < 1:
        raise TCURLoRAError("--rounds and --min-clients must be at least 1")
    host, port = split_address(address, "--address")
    if insecure:
        events.warning("INSECURE: --insecure given: adapter updates travel unencrypted and any host that reaches "
                       f"{address} can join; use TLS (--tls-dir) outside a test")
        tls = None
    elif not tls_dir:
        raise TCURLoRAError("give --tls-dir DIR (ca.crt, server.pem, server.key; `tcurlora federated certs` makes a "
                            "self-signed set) or --insecure")
    else:
        tls = server_certificate_files(tls_dir)
    manifest, state = read_adapter(initial_adapter(base, options, labels, out))
    train = {k: getattr(options, k) for k in TRAIN_KEYS if k != "labels"}
    train["patch_size"] = list(train["patch_size"]) if train["patch_size"] else None
    train["labels"] = manifest["labels"]
    events.log(f"federation on {address} ({'TLS' if tls else 'no TLS'}): {rounds} round(s) of "
               f"{options.steps} local step(s), {min_clients} site(s), {manifest['method']['name']} "
               f"rank {options.rank}, {state_bytes(state):,} bytes per site each way per round")
    with tempfile.TemporaryDirectory(prefix="tcurlora-superlink-") as home:
        home = Path(home)
        # the SuperLink connection `flwr run` uses: the SuperLink this command starts, over loopback (the
        # SuperLink's own processes connect there too, so a TLS certificate must also name 127.0.0.1)
        connection = {"address": f"{LOOPBACK}:{port}"}
        connection.update({"root-certificates": str(tls["ca"])} if tls else {"insecure": True})
        (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "tcurlora",
                                                                       "tcurlora": connection}}))
        summary = home / "summary.json"
        run_config = home / "run_config.toml"
        run_config.write_text(tomli_w.dumps({
            "rounds": rounds, "min-clients": min_clients, "initial": str(round_path(out, 0)), "out": str(out),
            "train": dumps(train), "events": app_events_target(events_file), "summary": str(summary)}))
        flags = ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]),
                 "--ssl-keyfile", str(tls["key"])] if tls else ["--insecure"]
        superlink = start([flower_command("flower-superlink"), "--host", host, "--port", str(port), *flags,
                           "--disable-runtime-dependency-installation"], home, "Flower's SuperLink")
        run = None
        try:
            wait_listening(LOOPBACK if host in ("0.0.0.0", "::", "localhost") else host, port, superlink, 60,
                           "Flower's SuperLink")
            # `--stream` shows the ServerApp's log here and returns when the run has ended
            run = start([flower_command("flwr"), "run", str(APP_DIR), "tcurlora", "--run-config", str(run_config),
                         "--stream"], home, "flwr run")
            run.wait()
        finally:
            for proc in (run, superlink):
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
            "metrics": {"rounds": history}, "cancelled": False}
