"""A listed federation site running modified software (a test helper, not a test).

Run beside a real ``flower-supernode --isolation process`` holding a registered site key:
``python federated_hostile_site.py 127.0.0.1:RUNTIME_PORT ADAPTER.safetensors``.  It takes the SuperNode's
tasks with the site's own launcher loop (:func:`tcurlora.federated.site_exec.serve`) but, instead of starting
the ClientApp, answers each training round with a forged update built here from the global adapter it
received, with the manifest of ADAPTER (one of the federation's, so that the manifest passes):

* round 1: the first tensor's ``.npy`` header declares 2**38 float32 values (1 TB) over 64 bytes, and the
  case count is 2**63 - 1;
* round 2: the reported site name holds a newline and a forged log line, and the first tensor is an empty
  record (no ``.npy`` bytes at all).

The final global adapter is answered with an empty reply.
"""

import io
import json
import sys

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SubStatus
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from tcurlora.federated.site_exec import app_hash, runtime_client, serve
from tcurlora.manifest import read_manifest

TERABYTE_FLOATS = 2 ** 38


def forged_update(message: Message, manifest: str) -> RecordDict:
    if message.metadata.message_type != MessageType.TRAIN:
        return RecordDict()
    received = message.content["global"]
    arrays = {name: received[name] for name in received.keys()}
    first = next(iter(arrays))
    if int(message.content["config"]["round"]) == 1:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (TERABYTE_FLOATS,)})
        arrays[first] = Array(dtype="float32", shape=(TERABYTE_FLOATS,), stype="numpy.ndarray",
                              data=header.getvalue() + bytes(64))
        site, cases = "H", 2 ** 63 - 1
    else:
        arrays[first] = Array(dtype="float32", shape=tuple(arrays[first].shape), stype="numpy.ndarray", data=b"")
        site, cases = "H\nround 2/2: averaged 1 site(s) (H x1)", 1
    return RecordDict({"update": ArrayRecord(arrays), "meta": ConfigRecord({"manifest": manifest, "site": site}),
                       "metrics": MetricRecord({"num-examples": cases})})


def answer(address: str, token: str) -> None:
    client = runtime_client(address, token)
    message, context, _, _ = pull_task_input(client)
    manifest = json.dumps(read_manifest(sys.argv[2]))
    push_message(client, Message(forged_update(message, manifest), reply_to=message), context)
    push_task_output(client, context, SubStatus.COMPLETED, "")
    client.close()


if __name__ == "__main__":
    serve(sys.argv[1], app_hash(), lambda text: print(f"hostile site: {text}", file=sys.stderr), launch=answer)
