"""The federation's Flower ``ClientApp``: a site's training in each round, and its copy of the final adapter.

Runs inside Flower's ``flwr-clientapp`` process, which the site's SuperNode starts for each message.  The
site's inputs come from the SuperNode's ``--node-config`` (written by ``tcurlora federated client``): ``base``,
``weights``, ``device``, ``cases`` (JSON list of [image, label]), ``out``, ``site``, ``seed``, ``events`` and
``status`` (where the end of the federation, or the error that stopped this site, is reported).
"""

from __future__ import annotations

import json
from functools import partial, wraps
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import app_events, from_record, round_path, to_record, write_json
from .checks import check_train_settings
from .client import train_round
from ..aggregate import read_adapter, write_adapter_tensors
from ..errors import TCURLoRAError

app = ClientApp()


def site_update(manifest: dict, state: dict, cases: int, site: str) -> RecordDict:
    """A site's reply: its adapter state, its manifest (what the server checks) and its case count."""
    return RecordDict({"update": to_record(state),
                       "meta": ConfigRecord({"manifest": json.dumps(manifest), "site": site}),
                       "metrics": MetricRecord({"num-examples": cases})})


def _reporting_errors(handler):
    """A site's error also goes to its status file, so that its launcher stops with it (one line)."""
    @wraps(handler)
    def run(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except Exception as exc:
            write_json(context.node_config["status"], {"error": str(exc) if isinstance(exc, TCURLoRAError)
                                                       else f"{type(exc).__name__}: {exc}"})
            raise
    return run


@app.train()
@_reporting_errors
def train(message: Message, context: Context) -> Message:
    from ..models import load_base

    node = context.node_config
    config = message.content["config"]
    server_round, pairs = int(config["round"]), json.loads(str(node["cases"]))
    events = app_events(str(node["events"]))
    # what the server sends is checked as a job file and an adapter file would be (regexes included)
    train = check_train_settings(json.loads(str(config["train"])), "the server's training settings")
    initial = from_record(message.content["global"], "the server's global adapter")
    events.log(f"round {server_round}/{config['rounds']}: training on {len(pairs)} case(s)")
    fold = int(node.get("fold", -1))
    manifest, state = train_round(partial(load_base, str(node["base"]), weights=str(node["weights"]) or None,
                                          fold=None if fold < 0 else fold),
                                  [tuple(p) for p in pairs], node["out"], server_round, train,
                                  initial, str(config["fingerprint"]), seed=int(node["seed"]),
                                  device=str(node["device"]), events=events)
    if list(state) != list(initial):
        raise TCURLoRAError("this site's adapter has other tensors than the server's")
    return Message(site_update(manifest, state, len(pairs), str(node["site"])), reply_to=message)


@app.query("global_adapter")
@_reporting_errors
def keep_global_adapter(message: Message, context: Context) -> Message:
    """The server's final global adapter: written as this site's result, with this site's last manifest."""
    node = context.node_config
    out, rounds = Path(str(node["out"])), int(message.content["config"]["round"])
    state = from_record(message.content["global"], "the server's global adapter")
    manifest, _ = read_adapter(round_path(out, rounds))  # the same layout as the global one: the server checked it
    provenance = {**manifest["provenance"], "federated_rounds": rounds, "cases": None,
                  "site_cases": len(json.loads(str(node["cases"])))}
    write_adapter_tensors(out, dict(manifest, provenance=provenance), state)
    trained = [str(round_path(out, r)) for r in range(1, rounds + 1) if round_path(out, r).exists()]
    write_json(node["status"], {"rounds": trained, "adapter": str(out)})
    app_events(str(node["events"])).log(f"federation done after {rounds} round(s): {out.name}")
    return Message(RecordDict(), reply_to=message)
