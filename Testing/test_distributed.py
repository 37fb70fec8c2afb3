"""torchrun: 2 CPU processes (gloo) train the adapter one process trains with the same global batch.

One process with ``--grad-accum 2`` and two ranks with ``--grad-accum 1`` take the same steps (each rank computes
one of the step's two micro-batches; DDP averages the gradients), so their adapters must agree to float
tolerance, here across a stop after the first step and a resume (so both the split and the checkpoint are
checked); only rank 0 writes events, the checkpoint and the adapter.
"""

import socket
import subprocess
import sys

import pytest
import torch

from tcurlora.aggregate import read_adapter
from conftest import CT, CT_VERT, SUBPROCESS_ENV, cli_subprocess, read_events

STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finetune_argv(tiny_unet, out, grad_accum, *extra):
    return ["finetune", *tiny_unet.args, "--image", CT, "--label", CT_VERT, "--val-image", CT, "--val-label", CT_VERT,
            "--val-image", CT, "--val-label", CT_VERT, "--steps", str(STEPS), "--val-every", "2", "--patience", "0",
            "--batch-size", "1", "--grad-accum", str(grad_accum), "--rank", "2", "--out", out, *extra]


def torchrun(tiny_unet, out, *extra):
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", "tcurlora",
            *map(str, finetune_argv(tiny_unet, out, 1, *extra))]
    return subprocess.run(argv, env=dict(SUBPROCESS_ENV, GLOO_SOCKET_IFNAME="lo"), capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def single(tiny_unet, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "one.safetensors"
    proc = subprocess.run(cli_subprocess(*finetune_argv(tiny_unet, out, 2)), env=SUBPROCESS_ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_adapter(out)


def assert_same_adapter(a, b):
    (ma, ta), (mb, tb) = a, b
    assert set(ta) == set(tb)
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=1e-5, atol=1e-6)
    assert ma["provenance"]["validation_dice"] == pytest.approx(mb["provenance"]["validation_dice"], abs=1e-9)


def test_two_ranks_equal_one_process_across_a_stop_and_resume(single, tiny_unet, tmp_path):
    out = tmp_path / "two.safetensors"
    events = tmp_path / "events.jsonl"
    stop = tmp_path / "STOP"
    stop.write_text("")
    first = torchrun(tiny_unet, out, "--stop-file", stop, "--events", events)
    assert first.returncode != 0 and "stopped at step 1" in first.stderr, first.stderr[-3000:]
    assert (tmp_path / "two.checkpoint.pt").is_file() and not out.exists()
    stop.unlink()
    second = torchrun(tiny_unet, out, "--resume", "--events", events)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming at step 1" in second.stderr
    assert_same_adapter(read_adapter(out), single)
    assert max(float(t.abs().max()) for t in single[1].values()) > 1e-4  # it trained
    records = read_events(events)
    assert [e["step"] for e in records if e["event"] == "progress"] == list(range(1, STEPS + 1))  # rank 0 alone
    assert [e["cancelled"] for e in records if e["event"] == "result"] == [True, False]
