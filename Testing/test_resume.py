"""Crash safety of training: periodic atomic checkpoints during the run, named from the adapter's full name
and bound to their run, so that a kill -9 (power loss, out-of-memory killer) costs at most the steps since
the last checkpoint and ``--resume`` never continues another run's state.

Base: the tiny random-init network spec of ``conftest.tiny_unet`` (plumbing, not segmentation quality).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from conftest import CT, CT_VERT, SUBPROCESS_ENV, cli_subprocess, read_events
from tcurlora import cli
from tcurlora.train import checkpoint_path, curve_path

pytestmark = pytest.mark.usefixtures("single_thread")  # same-seed runs are compared at one thread

STEPS = 8


def run(argv) -> int:
    return cli.main([os.fspath(a) for a in argv])


def training_args(tiny_unet, out, *extra):
    return ["finetune", *tiny_unet.args, "--image", CT, "--label", CT_VERT, "--val-image", CT, "--val-label", CT_VERT,
            "--out", out, "--steps", str(STEPS), "--val-every", "4", "--patience", "0", "--batch-size", "1",
            "--seed", "3", *extra]


def checkpoint_logs(events):
    return [e["message"] for e in events if e["event"] == "log" and e["message"].startswith("checkpoint at step")]


@pytest.fixture(scope="module")
def reference(single_thread, tiny_unet, tmp_path_factory):
    """The uninterrupted run (in-process, one thread), checkpointing every 2 steps."""
    folder = tmp_path_factory.mktemp("reference")
    out, ev = folder / "site.safetensors", folder / "events.jsonl"
    assert run(training_args(tiny_unet, out, "--checkpoint-every", "2", "--events", ev)) == 0
    return out, read_events(ev)


def test_checkpoints_during_training(reference):
    """A checkpoint is written every N steps during the run (not only at the end): steps 2, 4, 6."""
    out, events = reference
    assert checkpoint_logs(events) == [f"checkpoint at step {s}: site.checkpoint.pt" for s in (2, 4, 6)]
    state = torch.load(str(checkpoint_path(out)), map_location="cpu", weights_only=True)
    assert state["step"] == STEPS and state["run"]["adapter"] == str(out.resolve())
    assert [c["image"] for c in state["run"]["cases"]] == [CT.name]


def test_default_checkpoint_interval_is_time_based(tiny_unet, tmp_path, monkeypatch):
    """Without --checkpoint-every, a checkpoint is saved whenever protocol.CHECKPOINT_INTERVAL_S (2 minutes)
    have passed; with the interval set to 0 that is after every step."""
    from tcurlora import protocol

    assert protocol.CHECKPOINT_INTERVAL_S <= 300  # a kill loses at most a few minutes
    monkeypatch.setattr(protocol, "CHECKPOINT_INTERVAL_S", 0.0)
    ev = tmp_path / "ev.jsonl"
    assert run(["finetune", *tiny_unet.args, "--image", CT, "--label", CT_VERT, "--out", tmp_path / "a.safetensors",
                "--steps", "3", "--batch-size", "1", "--events", ev]) == 0
    assert len(checkpoint_logs(read_events(ev))) == 2  # steps 1 and 2; step 3 is the final save


def test_kill_9_mid_run_then_resume_reaches_the_same_adapter(reference, tiny_unet, tmp_path):
    """A real `tcurlora finetune` process is killed with SIGKILL (no handler can run) right after its
    checkpoint at step 2. `--resume` (another real process) continues from that checkpoint and ends with an
    adapter equal bit for bit to the uninterrupted run's (every step's randomness depends only on (seed, step);
    same thread count)."""
    out, ev = tmp_path / "site.safetensors", tmp_path / "events.jsonl"
    argv = training_args(tiny_unet, out, "--checkpoint-every", "2", "--events", ev)
    proc = subprocess.Popen(cli_subprocess(*argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=SUBPROCESS_ENV)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if ev.is_file() and checkpoint_logs(read_events(ev)):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "training ended before it could be killed: " + proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    events = read_events(ev)
    assert not [e for e in events if e["event"] == "result"] and not out.exists()
    killed_at = torch.load(str(checkpoint_path(out)), map_location="cpu", weights_only=True)["step"]
    assert killed_at in (2, 4, 6)
    print(f"killed at step {killed_at} of {STEPS}")

    resumed = subprocess.run(cli_subprocess(*argv, "--resume"), capture_output=True, text=True, timeout=300,
                             env=SUBPROCESS_ENV)
    assert resumed.returncode == 0, resumed.stderr
    events = read_events(ev)
    assert f"resuming at step {killed_at} of {STEPS}" in [e.get("message") for e in events]
    progress = [e["step"] for e in events if e["event"] == "progress"]
    assert progress[-(STEPS - killed_at):] == list(range(killed_at + 1, STEPS + 1))
    expected, got = load_file(str(reference[0])), load_file(str(out))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert curve_path(out).is_file()


def test_checkpoint_names_keep_the_whole_adapter_name(tiny_unet, tmp_path):
    """site.v1 and site.v2 get their own checkpoints and curves (the name was cut at the first dot, so the
    second run overwrote the first's checkpoint)."""
    assert checkpoint_path(tmp_path / "site.v1.safetensors").name == "site.v1.checkpoint.pt"
    assert curve_path(tmp_path / "site.v2.safetensors").name == "site.v2.curve.png"
    for name, steps in (("site.v1", "2"), ("site.v2", "3")):
        assert run(["finetune", *tiny_unet.args, "--image", CT, "--label", CT_VERT, "--out",
                    tmp_path / f"{name}.safetensors", "--steps", steps, "--batch-size", "1"]) == 0
    for name, steps in (("site.v1", 2), ("site.v2", 3)):
        state = torch.load(str(tmp_path / f"{name}.checkpoint.pt"), map_location="cpu", weights_only=True)
        assert state["step"] == steps
        assert (tmp_path / f"{name}.curve.png").is_file()


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_resume_refuses_another_runs_checkpoint(tiny_unet, tmp_path, capsys):
    """--resume with other cases (a label edited), other settings, or a checkpoint copied from another
    adapter's run: one line naming the checkpoint and what differs, exit 2, nothing trained or written."""
    out = tmp_path / "site.safetensors"
    base = ["finetune", *tiny_unet.args, "--out", out, "--steps", "4", "--batch-size", "1"]
    assert run(base + ["--image", CT, "--label", CT_VERT]) == 0
    before = checkpoint_path(out).read_bytes()
    out.unlink()

    label = sitk.ReadImage(str(CT_VERT))
    arr = sitk.GetArrayFromImage(label)
    arr[arr == 23] = 22  # the annotator corrected L4 to L3: same file name elsewhere, other data
    edited = sitk.GetImageFromArray(arr.astype(np.uint8))
    edited.CopyInformation(label)
    other = tmp_path / "other"
    other.mkdir()
    sitk.WriteImage(edited, str(other / CT_VERT.name))
    capsys.readouterr()
    assert run(base + ["--image", CT, "--label", other / CT_VERT.name, "--resume"]) == 2
    line = _error_line(capsys)
    assert line.startswith("error: site.checkpoint.pt: belongs to another run") and "training cases differ" in line

    assert run(base + ["--image", CT, "--label", CT_VERT, "--seed", "5", "--resume"]) == 2
    line = _error_line(capsys)
    assert "settings differ: seed 0 -> 5" in line

    moved = tmp_path / "clinic.safetensors"
    shutil.copyfile(checkpoint_path(out), checkpoint_path(moved))
    assert run(["finetune", *tiny_unet.args, "--out", moved, "--steps", "4", "--batch-size", "1", "--image", CT,
                "--label", CT_VERT, "--resume"]) == 2
    assert f"it was written for {out.resolve()}" in _error_line(capsys)

    assert checkpoint_path(out).read_bytes() == before  # refused runs leave the checkpoint as it was
    assert not out.exists() and not moved.exists()

    # the same files and settings resume (a finished run's checkpoint: nothing left to train, adapter rewritten)
    assert run(base + ["--image", CT, "--label", CT_VERT, "--resume"]) == 0
    assert out.is_file()


def test_resume_refuses_a_checkpoint_without_a_run_record(tiny_unet, tmp_path, capsys):
    """A checkpoint of the old format (no run record) or not a checkpoint at all: refused in one line, and a
    pickle inside is never run (weights_only)."""
    from conftest import Evil

    out = tmp_path / "a.safetensors"
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "payload": Evil(marker)}, str(checkpoint_path(out)))
    capsys.readouterr()
    assert run(["finetune", *tiny_unet.args, "--image", CT, "--label", CT_VERT, "--out", out, "--steps", "4",
                "--resume"]) == 2
    assert "a.checkpoint.pt: cannot read this checkpoint" in _error_line(capsys)
    assert not marker.exists()
    torch.save({"step": 2, "adapter": {}}, str(checkpoint_path(out)))
    assert run(["finetune", *tiny_unet.args, "--image", CT, "--label", CT_VERT, "--out", out, "--steps", "4",
                "--resume"]) == 2
    assert "a.checkpoint.pt: not a checkpoint of this tcurlora version" in _error_line(capsys)
