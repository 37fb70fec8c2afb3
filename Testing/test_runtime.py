"""tcurlora.runtime: what training and inference share (device choice, out-of-memory fallback), and that
inference no longer reaches into training's private helpers."""

from __future__ import annotations

import ast

import pytest
import torch

from conftest import REPO
from tcurlora.events import Events
from tcurlora.runtime import pick_device, with_oom_fallback


class Recorder(Events):
    def __init__(self):
        super().__init__()
        self.warnings = []

    def warning(self, message):
        self.warnings.append(message)


def test_oom_fallback_shrinks_then_moves_to_the_cpu():
    """Each CUDA out-of-memory error: one shrink (a warning each) while there is something to shrink, then the
    CPU; the attempt's own result comes back. (No GPU here: the error is raised by the attempt.)"""
    sizes, moved, events = [4], [], Recorder()

    def attempt():
        if sizes[-1] > 1 or not moved:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return "done"

    def shrink():
        if sizes[-1] == 1:
            return None
        sizes.append(sizes[-1] // 2)
        return f"retrying with {sizes[-1]}"

    assert with_oom_fallback(attempt, shrink, lambda: moved.append(True), events, "batch 1") == "done"
    assert sizes == [4, 2, 1] and moved == [True]
    assert events.warnings == ["retrying with 2", "retrying with 1",
                               "out of GPU memory at batch 1: continuing on the CPU (slower)"]


def test_segment_oom_halves_the_window_batch_then_uses_the_cpu(monkeypatch):
    import tcurlora.infer as infer

    calls = []

    def fake(network, x, roi, device, amp, sw_batch_size, overlap, tta, stop, mode):
        calls.append((device.type, sw_batch_size))
        if device.type != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return torch.zeros(1)

    monkeypatch.setattr(infer, "sliding_window_probabilities", fake)

    class Net(torch.nn.Module):
        def to(self, device):
            calls.append(("to", str(device)))
            return self

    base = type("Base", (), {"inference_roi": (8, 8, 8), "inference_mode": "gaussian"})()
    events = Recorder()
    infer._predict(Net(), torch.zeros(1, 8, 8, 8), base, torch.device("meta"), False, 4, 0.25, events)
    assert calls == [("meta", 4), ("meta", 2), ("meta", 1), ("to", "cpu"), ("cpu", 1)]
    assert len(events.warnings) == 3 and "continuing on the CPU" in events.warnings[-1]


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    from tcurlora.errors import TCURLoRAError

    with pytest.raises(TCURLoRAError, match="unknown device 'tpu'"):
        pick_device("tpu")


def test_inference_imports_no_private_helper_of_training():
    tree = ast.parse((REPO / "tcurlora" / "infer.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "train":
            pytest.fail(f"infer.py imports {[a.name for a in node.names]} from tcurlora.train")
