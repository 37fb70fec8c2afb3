"""The federation's Flower ``ServerApp``: R rounds of exact, case-weighted FedAvg over adapter state.

Runs inside Flower's ``flwr-serverapp`` process, started by the SuperLink for a ``flwr run`` of the app in
``flower_app/`` (``tcurlora federated server`` does both).  Its inputs are the run config (see that
pyproject); each round it sends the global state to every connected SuperNode as a ``train`` message, checks
every reply (:func:`.server.accept_update`), averages the accepted ones with
:func:`tcurlora.aggregate.weighted_mean` and writes the round's global adapter (atomically).  After the last
round every site gets the final global adapter (a ``query.global_adapter`` message).  The rounds completed,
or the error that stopped them, go to the run config's ``summary`` file, which the launcher reads.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from . import app_events, round_path, state_bytes, to_record, write_json
from .server import accept_update
from ..aggregate import merged_manifest, read_adapter, weighted_mean, write_adapter_tensors
from ..errors import TCURLoRAError

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
    fingerprint = manifest["base"]["fingerprint"]
    history = []
    for server_round in range(1, rounds + 1):
        nodes = wait_for_sites(grid, int(config["min-clients"]), events)  # every site connected by now takes part
        content = RecordDict({"global": to_record(state), "config": ConfigRecord({
            "round": server_round, "rounds": rounds, "fingerprint": fingerprint, "train": str(config["train"])})})
        events.log(f"round {server_round}/{rounds}: sending the global adapter ({state_bytes(state):,} bytes) "
                   f"to {len(nodes)} site(s)")
        replies = grid.send_and_receive(
            [Message(content, node, MessageType.TRAIN, group_id=str(server_round)) for node in nodes])
        states, weights, names, manifests = [], [], [], []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                events.warning(f"round {server_round}: site (node {node}) failed: {reply.error.reason}")
                continue
            try:
                site, update, site_manifest, cases = accept_update(manifest, state, reply.content, node)
            except TCURLoRAError as exc:
                events.warning(f"round {server_round}: update refused: {exc}")
                continue
            states.append(update)
            weights.append(cases)
            names.append(site)
            manifests.append(site_manifest)
        if not states:
            raise TCURLoRAError(f"round {server_round}: no acceptable update from any site")
        state = weighted_mean(states, weights, names)
        path = round_path(out, server_round)
        global_manifest = merged_manifest(manifests, weights, names, state, rounds=server_round)
        write_adapter_tensors(path, global_manifest, state)
        history.append({"round": server_round, "sites": names, "weights": weights, "adapter": str(path),
                        "bytes_per_site_each_way": state_bytes(state),
                        # what Flower ships: the .npy bytes of the ArrayRecord (array headers included)
                        "record_bytes_per_site_each_way": to_record(state).count_bytes()})
        events.log(f"round {server_round}/{rounds}: averaged {len(states)} site(s) "
                   f"({', '.join(f'{n} x{w}' for n, w in zip(names, weights))}) -> {path.name}")
    write_adapter_tensors(out, global_manifest, state)
    # every site keeps the final global adapter as its result
    final = RecordDict({"global": to_record(state), "config": ConfigRecord({"round": rounds})})
    nodes = sorted(grid.get_node_ids())
    for reply in grid.send_and_receive([Message(final, node, FINAL_MESSAGE) for node in nodes]):
        if reply.has_error():
            events.warning(f"site (node {reply.metadata.src_node_id}) did not take the final global adapter: "
                           f"{reply.error.reason}")
    events.log(f"{rounds} round(s) done: {out.name} sent to {len(nodes)} site(s)")
    return history
