"""Shared files are untrusted, end to end through the command line: a truncated scan never replaces a good
segmentation, a DICOM folder with several series is never guessed, a crafted regular expression never
hangs `inspect` or `segment`, and an adapter replaced while it is read never crashes the reader."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import CT, CT_VERT, SUBPROCESS_ENV, VERTEBRAE, cli_subprocess, assert_one_line_error, write_dicom_series
from tcurlora import cli

pytestmark = pytest.mark.usefixtures("single_thread")


def run_cli(capsys, *argv):
    capsys.readouterr()
    code = cli.main([os.fspath(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def test_truncated_scan_neither_trains_nor_replaces_a_good_segmentation(tiny_unet, tmp_path, capsys):
    out = tmp_path / "ct.seg.nrrd"
    code, err = run_cli(capsys, "segment", *tiny_unet.args, CT, "-o", out)
    assert code == 0, err
    good = out.read_bytes()
    cut = tmp_path / "ct_cut.nii.gz"
    data = CT.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])

    code, err = run_cli(capsys, "segment", *tiny_unet.args, cut, "-o", out)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ct_cut.nii.gz: "), err
    assert "truncated" in err[0]
    assert out.read_bytes() == good, "a good output was overwritten"

    adapter = tmp_path / "site.safetensors"
    code, err = run_cli(capsys, "finetune", *tiny_unet.args, "--image", cut, "--label", CT_VERT, "--out", adapter,
                        "--steps", "1", "--batch-size", "1")
    assert code == 2 and len(err) == 1 and "ct_cut.nii.gz: " in err[0] and "truncated" in err[0], err
    assert not adapter.exists()


def test_dicom_folder_with_several_series_needs_series_uid(tiny_unet, tmp_path, capsys):
    ct = sitk.ReadImage(str(CT))
    folder = tmp_path / "study"
    ct_uid, scout_uid = "1.2.826.0.1.3680043.2.1125.9.1", "1.2.826.0.1.3680043.2.1125.9.2"
    write_dicom_series(ct, folder, ct_uid, "CT spine")
    write_dicom_series(ct[:, :, :3], folder, scout_uid, "scout")
    out = tmp_path / "study.seg.nrrd"

    code, err = run_cli(capsys, "segment", *tiny_unet.args, folder, "-o", out)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: study: holds 2 DICOM series"), err
    assert f"{ct_uid} (CT spine, 73 files)" in err[0] and f"{scout_uid} (scout, 3 files)" in err[0]
    assert not out.exists()

    code, err = run_cli(capsys, "segment", *tiny_unet.args, "--series", ct_uid, folder, "-o", out)
    assert code == 0, err
    label = sitk.ReadImage(str(out))
    assert label.GetSize() == ct.GetSize()
    np.testing.assert_allclose(label.GetOrigin(), ct.GetOrigin(), atol=1e-3)

    code, err = run_cli(capsys, "segment", *tiny_unet.args, "--series", "1.2.3", folder, "-o", tmp_path / "x.seg.nrrd")
    assert code == 2 and "has no DICOM series 1.2.3" in err[0] and ct_uid in err[0], err


@pytest.fixture(scope="module")
def spec_adapter(tiny_unet, tmp_path_factory):
    """A perturbed rank-2 tCURLoRA adapter for the tiny spec base (what `segment --adapter` loads)."""
    import torch

    from tcurlora import TCURLoRAConfig, inject_adapter, save_adapter
    from tcurlora.adapter import get_adapter
    from tcurlora.models import load_base

    base = load_base(str(tiny_unet.spec), weights=str(tiny_unet.weights))
    inject_adapter(base.network, TCURLoRAConfig(rank=2))
    with torch.no_grad():
        for p in get_adapter(base.network).parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    path = tmp_path_factory.mktemp("spec_adapter") / "site.safetensors"
    save_adapter(base.network, path, labels=VERTEBRAE)
    return path


def rewrite_manifest(src, dst, mutate):
    from safetensors.torch import load_file, save_file

    from tcurlora.manifest import METADATA_KEY, read_header

    manifest = json.loads(read_header(src)[0][METADATA_KEY])
    mutate(manifest)
    save_file(load_file(src), str(dst), metadata={METADATA_KEY: json.dumps(manifest)})
    return dst


EVIL = "(.*.*)*X"


@pytest.mark.parametrize("field", ["train_modules", "exclude_modules", "stacks"])
def test_pathological_regex_in_an_adapter_is_refused_by_inspect_and_load(tiny_unet, spec_adapter, tmp_path, field,
                                                                        capsys):
    """`(.*.*)*X` backtracks exponentially: it hung `segment` while `inspect` showed the adapter as normal."""
    from tcurlora import load_adapter
    from tcurlora.errors import TCURLoRAError
    from tcurlora.models import load_base

    value = {"s": [EVIL]} if field == "stacks" else [EVIL]
    crafted = rewrite_manifest(spec_adapter, tmp_path / "evil.safetensors",
                               lambda m: m["method"]["config"].update({field: value}))
    code, err = run_cli(capsys, "inspect", crafted)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: evil.safetensors: ") and "nests repetitions" in err[0], err
    base = load_base(str(tiny_unet.spec), weights=str(tiny_unet.weights))

    def hang(signum, frame):  # re checks for signals while it backtracks: a hang fails the test, not the run
        raise TimeoutError("load_adapter ran for 30 s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(30)
    try:
        with pytest.raises(TCURLoRAError, match="nests repetitions"):
            load_adapter(base.network, crafted)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_pathological_regex_never_hangs_segment(tiny_unet, spec_adapter, tmp_path):
    crafted = rewrite_manifest(spec_adapter, tmp_path / "evil.safetensors",
                               lambda m: m["method"]["config"].update(train_modules=[EVIL]))
    out = tmp_path / "x.seg.nrrd"
    t0 = time.monotonic()  # a subprocess with a time limit: on a hang the test fails instead of hanging too
    proc = subprocess.run(cli_subprocess("segment", *tiny_unet.args, "--adapter", crafted, CT, "-o", out),
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120)
    line = assert_one_line_error(proc)
    assert line.startswith("error: evil.safetensors: ") and "nests repetitions" in line, line
    assert time.monotonic() - t0 < 60 and not out.exists()


LOADER = textwrap.dedent("""
    import sys, torch
    from tcurlora import TCURLoRAConfig, load_adapter
    from tcurlora.errors import TCURLoRAError
    loaded = refused = 0
    for i in range(int(sys.argv[2])):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(2048, 4096))
        try:
            load_adapter(model, sys.argv[1])
            loaded += 1
        except TCURLoRAError as exc:
            assert "\\n" not in str(exc)
            refused += 1
    print(loaded, refused)
""")


def test_adapter_rewritten_in_place_while_it_is_read_never_crashes_the_reader(tmp_path):
    """The reader memory-mapped the file: truncating it under the reader (an editor or a copy replacing it in
    place) raised SIGBUS and killed `segment`. Now the file is read into memory, then parsed."""
    import torch

    from tcurlora import TCURLoRAConfig, inject_adapter, save_adapter

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2048, 4096))
    inject_adapter(model, TCURLoRAConfig(method="full"))
    path = tmp_path / "full.safetensors"
    save_adapter(model, path)
    data = path.read_bytes()  # 32 MB
    stop = threading.Event()
    rewrites = [0]

    def rewrite_in_place():
        jitter = np.random.default_rng(0)
        while not stop.is_set():
            time.sleep(jitter.uniform(0.0, 0.03))  # whole for a while: readers get past the header
            with open(path, "r+b") as f:
                f.truncate(4096)  # cut short, then written back whole, in the same inode
                f.seek(0)
                f.write(data)
            rewrites[0] += 1

    writer = threading.Thread(target=rewrite_in_place)
    writer.start()
    try:
        proc = subprocess.run([sys.executable, "-c", LOADER, str(path), "40"], capture_output=True, text=True,
                              env=SUBPROCESS_ENV, timeout=300)
    finally:
        stop.set()
        writer.join()
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])  # -7 was SIGBUS
    loaded, refused = map(int, proc.stdout.split())
    print(f"\n40 loads during {rewrites[0]} in-place rewrites: {loaded} loaded, {refused} refused in one line")
    assert loaded + refused == 40 and loaded > 0
