"""The federation's Flower ``ServerApp``: R rounds of exact, case-weighted FedAvg over adapter state.

Runs inside Flower's ``flwr-serverapp`` process, started by the SuperLink for a ``flwr run`` of the app in
``flower_app/`` (``tcurlora federated server`` does both).  Its inputs are the run config (see that
pyproject); each round it sends the global state to every connected SuperNode as a ``train`` message, checks
every reply (:func:`.server.accept_update`), drops the site of a reply that fails a check (with the reason as
a warning and in the round's history), averages the accepted ones with :func:`tcurlora.aggregate.weighted_mean`
and writes the round's global adapter (atomically).  After the last
round every site gets the final global adapter (a ``query.global_adapter`` message).  The rounds completed,
or the error that stopped them, go to the run config's ``summary`` file, which the launcher reads.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from . import app_events, dumps, round_path, state_bytes, to_record, write_json
from .checks import check_site_name, check_train_settings
from .server import accept_update
from ..aggregate import merged_manifest, read_adapter, weighted_mean, write_adapter_tensors
from ..errors import TCURLoRAError
from ..manifest import _clip

FINAL_MESSAGE = f"{MessageType.QUERY}.global_adapter"

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    events = app_events(str(config["events"]))
    try:
        history = run_rounds(grid, config, events)
    except Exception as exc:
        message = str(exc) if isinstance(exc, TCURLoRAError) else "".join(
            traceback.format_exception_only(type(exc), exc)).strip()
        events.error(message)
        write_json(config["summary"], {"error": message})
        raise
    write_json(config["summary"], {"rounds": history})


def wait_for_sites(grid: Grid, count: int, events) -> list:
    nodes = sorted(grid.get_node_ids())
    if len(nodes) < count:
        events.log(f"waiting for {count} site(s) to connect ({len(nodes)} so far)")
    while len(nodes) < count:
        time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
    return nodes


def run_rounds(grid: Grid, config: dict, events) -> list:
    manifest, state = read_adapter(config["initial"])
    rounds, out = int(config["rounds"]), Path(str(config["out"]))
    train = check_train_settings(json.loads(str(config["train"])), "the run config")
    sites = {int(node): check_site_name(name, "the run config")
             for node, name in json.loads(str(config["sites"])).items()}
    max_cases = int(config["max-site-cases"])

    def site_of(node: int) -> str:
        return sites.get(node, f"(node {node})")

    fingerprint = manifest["base"]["fingerprint"]
    history = []
    for server_round in range(1, rounds + 1):
        nodes = wait_for_sites(grid, int(config["min-clients"]), events)  # every site connected by now takes part
        content = RecordDict({"global": to_record(state), "config": ConfigRecord({
            "round": server_round, "rounds": rounds, "fingerprint": fingerprint, "train": dumps(train)})})
        events.log(f"round {server_round}/{rounds}: sending the global adapter ({state_bytes(state):,} bytes) "
                   f"to {len(nodes)} site(s)")
        replies = grid.send_and_receive(
            [Message(content, node, MessageType.TRAIN, group_id=str(server_round)) for node in nodes])
        states, weights, names, reported, dropped = [], [], [], [], []
        for reply in replies:
            node = reply.metadata.src_node_id
            try:
                if reply.has_error():
                    raise TCURLoRAError(f"site {site_of(node)}: failed: {_clip(reply.error.reason)}")
                site, update, cases, weight = accept_update(manifest, state, reply.content, node, sites.get(node),
                                                            max_cases)
            except Exception as exc:  # noqa: BLE001 - whatever a site sent, it is that site's reply that goes
                reason = str(exc) if isinstance(exc, TCURLoRAError) else \
                    f"site {site_of(node)}: unreadable reply ({type(exc).__name__})"
                events.warning(f"round {server_round}: dropped {reason}")
                dropped.append({"node": node, "reason": reason})
                continue
            if weight < cases:
                events.warning(f"round {server_round}: site {site} reports {cases:,} cases; weighed as {weight} "
                               "(--max-site-cases)")
            states.append(update)
            weights.append(weight)
            names.append(site)
            reported.append(cases)
        if not states:
            raise TCURLoRAError(f"round {server_round}: no acceptable update from any site")
        state = weighted_mean(states, weights, names)
        path = round_path(out, server_round)
        # the server's own manifest with the weights used: nothing a site wrote reaches the global adapter's
        # header but its tensors
        counted = [dict(manifest, provenance={"cases": w}) for w in weights]
        global_manifest = merged_manifest(counted, weights, names, state, rounds=server_round)
        write_adapter_tensors(path, global_manifest, state)
        history.append({"round": server_round, "sites": names, "weights": weights, "cases_reported": reported,
                        "dropped": dropped, "adapter": str(path), "bytes_per_site_each_way": state_bytes(state),
                        # what Flower ships: the .npy bytes of the ArrayRecord (array headers included)
                        "record_bytes_per_site_each_way": to_record(state).count_bytes()})
        total = sum(weights)
        events.log(f"round {server_round}/{rounds}: averaged {len(states)} site(s) "
                   f"({', '.join(f'{n} x{w} ({100 * w / total:.0f}%)' for n, w in zip(names, weights))}) -> "
                   f"{path.name}")
    write_adapter_tensors(out, global_manifest, state)
    # every site keeps the final global adapter as its result
    final = RecordDict({"global": to_record(state), "config": ConfigRecord({"round": rounds})})
    nodes = sorted(grid.get_node_ids())
    for reply in grid.send_and_receive([Message(final, node, FINAL_MESSAGE) for node in nodes]):
        if reply.has_error():
            node = reply.metadata.src_node_id
            events.warning(f"site {site_of(node)} did not take the final global adapter: "
                           f"{_clip(reply.error.reason)}")
    events.log(f"{rounds} round(s) done: {out.name} sent to {len(nodes)} site(s)")
    return history
