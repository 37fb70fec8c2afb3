"""The README's main job, in its reduced mode, so it cannot rot: real deepbet, real scans, real files."""

import json
import subprocess
import sys

import pytest

from tcurlora.manifest import read_manifest


@pytest.mark.network
@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "tcurlora.cli", "demo", "--quick", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "base zero-shot" in proc.stdout and "tcurlora" in proc.stdout
    for name in ("adapter_tcurlora.safetensors", "adapter_tcurlora.curve.png", "robex_tcurlora.seg.nrrd",
                 "robex_zero_shot.seg.nrrd", "overlay.png", "results.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "overlay.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "results.json").read_text())
    zero, adapted = summary["results"]["base zero-shot"], summary["results"]["tcurlora"]
    # real pretrained weights on a real held-out head: zero-shot is already a good brain mask
    assert 0.85 < zero["dice"] < 0.99
    assert 0.0 < adapted["dice"] <= 1.0
    manifest = read_manifest(out / "adapter_tcurlora.safetensors")
    assert manifest["base"]["name"] == "deepbet" and manifest["provenance"]["cases"] == 1
    assert manifest["labels"][0]["name"] == "Brain"
    assert (out / "adapter_tcurlora.safetensors").stat().st_size < 64 * 1024
