"""Seeded fuzz of the base-model readers: the suite's real nnU-Net folder (made by nnU-Net's own trainer), an
Auto3DSeg model zip (made with MONAI) and a MONAI bundle, mutated in their JSON values and types, their
nesting, their declared sizes, their CSV table, their checkpoints' fields and their bytes (zip headers, CRCs,
compression), then loaded with ``load_base`` and listed with ``models --discover``.

Every case must end in a clean refusal (a :class:`TCURLoRAError` with one printable line) or in a loaded base:
never another exception, never a hang (each case runs under an alarm) and never an allocation beyond a limit
(peak RSS). The case list is a function of the seed; a failure names the seed and the case index to replay.
"""

from __future__ import annotations

import copy
import io
import json
import random
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import CT, CT_VERT
from tcurlora.errors import TCURLoRAError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from auto3dseg_model import make_model  # noqa: E402
from fuzzing import mutate, run  # noqa: E402
from test_bundle_settings import INFERER, TRANSFORMS, write_bundle  # noqa: E402

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]

SEED = 20261205
CASES = 3000  # 1,878 ran in 100 s on this 2-core machine while other jobs kept its load average at 7
TIME_BUDGET_S = 90  # a slower (or busier) machine runs fewer cases, never more than this
CASE_TIMEOUT_S = 10
#: The memory the readers are told this machine has (what they may plan to allocate), and what the process may
#: grow by: a base within that limit is really built (its weights, then the checkpoint's state loaded into it),
#: so up to about twice the limit plus the allocator's own growth (387 MB was seen with 384 allowed); the sizes
#: the mutated files declare go up to terabytes, and a network of a million layers took 19 GB before
#: construct.MAX_MODULES.
AVAILABLE_MEMORY = 256 * 2 ** 20
MAX_RSS_GROWTH = 3 * AVAILABLE_MEMORY

NASTY = [None, True, False, 0, -1, 1, 2, 3, 5, 7, 0.0, 0.5, -0.5, 1e-9, 1e9, 2 ** 31, 2 ** 63, 10 ** 30, 1e308,
         float("nan"), float("inf"), "", "x", "x" * 3000, "a\nb", "\x1b[2J", "\u202eevil", "a|b", "a~b^c",
         "@network_def", "@nowhere::x", "$1+1", "%macro", "https://example.org/w.pth", "../../etc/passwd",
         "torch.nn.Conv3d", "os.system", "SegResNetDS", "UNet", "DenseNet121", "EfficientNetBN", "CTNormalization",
         "resample_data_or_seg_to_shape", "3d_fullres", [], {}, [0], [1, 1], [0, 1, 2], [2, 1, 0], [0, 0, 1],
         [0, 1, 3], [512, 512, 512], [1024] * 3, [10 ** 9] * 3, [0, 0, 0], [-1, 2, 2], [1.5, 1.5, 1.5], [1e-6] * 3,
         [[3, 3, 3]] * 5, [[2, 2, 2]] * 9, [4096] * 5, {"0": "bg", "1": "x"}, {"a": 1}, {"pretrained": True}]
WRAPS = [lambda v: [v], lambda v: {"value": v}, lambda v: json.loads("[" * 70 + json.dumps(v) + "]" * 70)]


def mutate_tree(rng, tree, focus=()):
    """One change at a random place of ``tree`` (a place under ``focus`` most of the time)."""
    mutate(rng, tree, NASTY, focus, ops=("nasty", "nasty", "nasty", "delete", "duplicate", "numeric", "wrap"),
           numbers=lambda n: [n + 1, n - 1, n * 1000, -n, n * 1.5, 2 ** 31 - 1, n * 10 ** 6],
           wrap=lambda rng, value: rng.choice(WRAPS)(value))


def mutate_text(rng, text: str) -> str:
    i = rng.randrange(len(text) + 1)
    return rng.choice([text[:i], text[:i] + rng.choice(["\x00", "}", "\"", "NaN", "\n", "1e999", "\xff", "|", "~"])
                       + text[i + 1:], "[" * 100_000 + "]" * 100_000, text + "garbage"])


def mutate_bytes(rng, data: bytes) -> bytes:
    data = bytearray(data)
    op = rng.choice(["flip", "truncate", "append", "zero"])
    if op == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        data = data[: rng.randrange(len(data))]
    elif op == "append":
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        i = rng.randrange(len(data))
        data[i:i + 64] = bytes(min(64, len(data) - i))
    return bytes(data)


def mutate_zip_header(rng, data: bytes) -> bytes:
    """A field of a local or central zip header set to a crafted value: method, sizes, CRC, name length."""
    data = bytearray(data)
    signature = rng.choice([b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"])
    starts, at = [], data.find(signature)
    while at >= 0:
        starts.append(at)
        at = data.find(signature, at + 4)
    if not starts:
        return bytes(data)
    at = rng.choice(starts)
    offsets = {b"PK\x03\x04": [(8, 2), (14, 4), (18, 4), (22, 4), (26, 2)],
               b"PK\x01\x02": [(10, 2), (16, 4), (20, 4), (24, 4), (28, 2), (42, 4)],
               b"PK\x05\x06": [(8, 2), (10, 2), (12, 4), (16, 4)]}[bytes(signature)]
    offset, width = rng.choice(offsets)
    value = rng.choice([0, 1, 12, 14, 99, 2 ** (8 * width) - 1, 10 ** 6 % 2 ** (8 * width), rng.getrandbits(8 * width)])
    data[at + offset:at + offset + width] = value.to_bytes(width, "little")
    return bytes(data)


# ----------------------------------------------------------------------------------------------
# the three sources


@pytest.fixture(scope="module")
def sources(nnunet_model, tmp_path_factory):
    from tcurlora.models.nnunet import read_checkpoint

    root = tmp_path_factory.mktemp("fuzz_bases")
    nnunet = {name: (nnunet_model.folder / name).read_bytes() for name in ("plans.json", "dataset.json")}
    # the trainer's checkpoint without its optimizer state (most of its pickle, which nothing here reads):
    # every case reads it, and the fuzz runs 3x the cases in its time
    checkpoint = read_checkpoint(nnunet_model.folder / "fold_0" / "checkpoint_final.pth")
    checkpoint["optimizer_state"] = None
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    nnunet["checkpoint"], nnunet["checkpoint_dict"] = buffer.getvalue(), checkpoint
    model = make_model(root / "a3d", CT, CT_VERT, steps=1)
    a3d = {"model.pt": (model / "model.pt").read_bytes(), "labels.csv": (model / "labels.csv").read_bytes(),
           "checkpoint_dict": torch.load(model / "model.pt", weights_only=True)}
    bundle = write_bundle(root / "bundle", TRANSFORMS, INFERER)
    bundle_files = {name: (bundle / "configs" / name).read_bytes() for name in ("inference.json", "metadata.json")}
    bundle_files["model.pt"] = (bundle / "models" / "model.pt").read_bytes()
    return {"nnunet": nnunet, "auto3dseg": a3d, "bundle": bundle_files, "folder_name": nnunet_model.folder.name}


def mutate_file(rng, files: dict, name: str, focus=()) -> None:
    """One :func:`mutate_tree` of the JSON file ``files[name]``; none once a text mutation has broken it."""
    try:
        tree = json.loads(files[name])
    except (ValueError, RecursionError):
        return
    mutate_tree(rng, tree, focus)
    files[name] = json.dumps(tree).encode()


def make_nnunet(rng, src, folder: Path, rounds: int = None) -> Path:
    model = folder / "Dataset901_TPTBoxCT" / src["folder_name"]
    (model / "fold_0").mkdir(parents=True)
    nn = src["nnunet"]
    files = {"plans.json": nn["plans.json"], "dataset.json": nn["dataset.json"], "checkpoint": nn["checkpoint"]}
    for _ in range(rng.randint(1, 2) if rounds is None else rounds):
        where = rng.choice(["plans", "plans", "plans", "plans", "dataset", "checkpoint-fields", "checkpoint-bytes",
                            "text"])
        if where == "plans":
            mutate_file(rng, files, "plans.json", rng.choice([("configurations", "3d_fullres"),
                                                              ("configurations", "3d_fullres", "architecture"), ()]))
        elif where == "dataset":
            mutate_file(rng, files, "dataset.json")
        elif where == "checkpoint-fields":
            checkpoint = dict(nn["checkpoint_dict"])
            checkpoint["init_args"] = dict(checkpoint["init_args"])
            fields = {"inference_allowed_mirroring_axes": checkpoint["inference_allowed_mirroring_axes"],
                      "trainer_name": checkpoint["trainer_name"],
                      "configuration": checkpoint["init_args"]["configuration"]}
            key = rng.choice(sorted(fields))
            value = copy.deepcopy(rng.choice(NASTY + [(0, 5), (1, 1), 2, (0, 1, 2, 0)]))
            (checkpoint["init_args"] if key == "configuration" else checkpoint)[key] = value
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            files["checkpoint"] = buffer.getvalue()
        elif where == "checkpoint-bytes":
            files["checkpoint"] = mutate_bytes(rng, files["checkpoint"])
        else:
            name = rng.choice(["plans.json", "dataset.json"])
            files[name] = mutate_text(rng, files[name].decode("utf-8", "replace")).encode("utf-8", "surrogatepass")
    (model / "plans.json").write_bytes(files["plans.json"])
    (model / "dataset.json").write_bytes(files["dataset.json"])
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(files["checkpoint"])
    return model


def make_auto3dseg(rng, src, folder: Path, rounds: int = None) -> Path:
    a3d = src["auto3dseg"]
    model_pt, labels = a3d["model.pt"], a3d["labels.csv"]
    bytes_op = None
    for _ in range(rng.randint(1, 2) if rounds is None else rounds):
        where = rng.choice(["config", "config", "csv", "csv", "zip-bytes", "zip-header", "bomb", "checkpoint-bytes"])
        if where == "config":
            checkpoint = {**a3d["checkpoint_dict"], "config": copy.deepcopy(a3d["checkpoint_dict"]["config"])}
            mutate_tree(rng, checkpoint["config"], rng.choice([("network",), ()]))
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            model_pt = buffer.getvalue()
        elif where == "csv":
            text = labels.decode("utf-8")
            rows = [line.split(",") for line in text.splitlines()]
            r, c = rng.randrange(len(rows)), rng.randrange(len(rows[0]))
            rows[r] = rows[r] + [""] * (len(rows[0]) - len(rows[r]))
            rows[r][c] = str(rng.choice(NASTY + ["-3", "70000", "1.5", "\"open", "x" * 200_000, "0", "3"]))
            labels = "\n".join(",".join(row) for row in rows).encode("utf-8", "surrogatepass") \
                if rng.random() < 0.9 else mutate_text(rng, text).encode("utf-8", "surrogatepass")
        elif where == "bomb":
            labels = b"LabelValue,Name\n" + b"0" * rng.choice([1 << 16, 1 << 20, 1 << 23])
        elif where == "checkpoint-bytes":
            model_pt = mutate_bytes(rng, model_pt)
        else:
            bytes_op = where
    if rounds != 0 and rng.random() < 0.2 and bytes_op is None:  # a model folder, as the extension unpacks it
        (folder / "model").mkdir()
        (folder / "model" / "model.pt").write_bytes(model_pt)
        (folder / "model" / "labels.csv").write_bytes(labels)
        return folder / "model"
    archive = folder / "model.zip"
    method = zipfile.ZIP_DEFLATED if rounds == 0 else rng.choice([zipfile.ZIP_DEFLATED] * 5 + [zipfile.ZIP_STORED] * 2
                                                                 + [zipfile.ZIP_BZIP2])
    with zipfile.ZipFile(archive, "w", method) as zf:
        zf.writestr("segresnet/model.pt", model_pt)
        zf.writestr("segresnet/labels.csv", labels)
    if bytes_op == "zip-bytes":
        archive.write_bytes(mutate_bytes(rng, archive.read_bytes()))
    elif bytes_op == "zip-header":
        archive.write_bytes(mutate_zip_header(rng, archive.read_bytes()))
    return archive


def make_bundle(rng, src, folder: Path, rounds: int = None) -> Path:
    files = dict(src["bundle"])
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    for _ in range(rng.randint(1, 2) if rounds is None else rounds):
        where = rng.choice(["inference", "inference", "inference", "metadata", "tcurlora", "weights", "text"])
        if where == "inference":
            mutate_file(rng, files, "inference.json", rng.choice([("network_def",), ("inferer",),
                                                                  ("preprocessing", "transforms")]))
        elif where == "metadata":
            mutate_file(rng, files, "metadata.json")
        elif where == "tcurlora":
            extra = {"labels": [{"value": 1, "name": "L2"}, {"value": 2, "name": "L3"}, {"value": 3, "name": "L4"}],
                     "inference_roi": [32, 32, 32], "head": "model.2.1.conv.unit0.conv",
                     "decoder_modules": [r"model\.2(\..*)?"], "inference_overlap": 0.5}
            mutate_tree(rng, extra)
            files["tcurlora.json"] = json.dumps(extra).encode()
        elif where == "weights":
            files["model.pt"] = mutate_bytes(rng, files["model.pt"])
        else:
            name = rng.choice(["inference.json", "metadata.json"])
            files[name] = mutate_text(rng, files[name].decode("utf-8")).encode("utf-8", "surrogatepass")
    for name, data in files.items():
        (folder / ("models" if name == "model.pt" else "configs") / name).write_bytes(data)
    return folder


MAKERS = {"nnunet": make_nnunet, "auto3dseg": make_auto3dseg, "bundle": make_bundle}


# ----------------------------------------------------------------------------------------------
# the run


def _printable(text: str) -> bool:
    return all(ch.isprintable() for ch in text)


def check_case(kind: str, base_path: Path, root: Path) -> str:
    """'refused' or 'loaded'; raises AssertionError (or anything else) for a failure."""
    from tcurlora.models import load_base
    from tcurlora.models.discover import describe, discover_models

    listed = discover_models({"nnunet" if kind == "nnunet" else kind: [root]})
    assert all(_printable(describe(entry)) for entry in listed)
    try:
        base = load_base(base_path, fold=0 if kind == "nnunet" else None)
    except TCURLoRAError as exc:
        message = str(exc)
        assert "\n" not in message and _printable(message) and ": " in message, message
        return "refused"
    assert base.labels and all(_printable(label["name"]) for label in base.labels)
    assert len(base.inference_roi) == 3 and base.window_bytes >= 0
    return "loaded"


def test_fuzz_base_model_readers(sources, tmp_path, monkeypatch):
    from tcurlora import limits

    monkeypatch.setattr(limits, "available_memory", lambda: AVAILABLE_MEMORY)
    for kind, maker in MAKERS.items():  # warm up: the unmutated bases load (imports, allocator)
        folder = tmp_path / f"warm_{kind}"
        folder.mkdir()
        assert check_case(kind, maker(random.Random(0), sources, folder, rounds=0), folder) == "loaded"

    def make(rng):
        kind = rng.choice(sorted(MAKERS))
        folder = tmp_path / "case"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        base_path = MAKERS[kind](rng, sources, folder)
        return kind, lambda: check_case(kind, base_path, folder)

    result = run(SEED, CASES, TIME_BUDGET_S, CASE_TIMEOUT_S, make)
    counts = {kind: {outcome: result.counts[(kind, outcome)] for outcome in ("refused", "loaded")} for kind in MAKERS}
    failures, total, growth = result.failures, result.total, result.rss_growth
    print(f"\nfuzz: {total} cases in {result.seconds:.0f} s: " + "; ".join(
        f"{kind} {c['refused']} refused, {c['loaded']} loaded" for kind, c in counts.items())
        + f"; {len(failures)} failures; peak RSS growth {growth / 2 ** 20:.1f} MB")
    assert not failures, f"{len(failures)} of {total} cases failed; first:\n" + "\n".join(failures[:3])
    assert total >= min(CASES, 300), "too few cases ran to mean anything"
    assert all(c["loaded"] > 0 and c["refused"] > 0 for c in counts.values()), counts
    assert growth <= MAX_RSS_GROWTH, f"peak RSS grew by {growth / 2 ** 20:.0f} MB"
