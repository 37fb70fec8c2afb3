"""Seeded fuzz of adapter files: real adapters of the tiny UNet (tCURLoRA, tCURLoRA with a new head, decoder,
PEFT LoRA with a fully trained output layer), mutated in their manifest, their safetensors header and their bytes, then read by ``inspect``
and loaded into a fresh base.

Every case must end in a clean refusal (a :class:`TCURLoRAError` with a one-line message, the model left
as it was) or in a loaded adapter whose output is finite: never another exception, never a hang (each case
runs under an alarm), and never an allocation beyond what the files' real tensors need (peak RSS).
The case list is a function of the seed; a failure names the seed and the case index to replay.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pytest
import torch
from monai.networks.nets import UNet
from safetensors.torch import save_file

from tcurlora import TCURLoRAConfig, inject_adapter, load_adapter, read_manifest, save_adapter
from tcurlora.adapter import get_adapter, list_adapters
from tcurlora.errors import TCURLoRAError
from tcurlora.manifest import METADATA_KEY, summary

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzzing import mutate, run  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

SEED = 20261201
CASES = 4000  # about 40 s on one busy core of this 2-core machine
TIME_BUDGET_S = 90  # a slower machine runs fewer cases, never more than this
CASE_TIMEOUT_S = 10
MAX_RSS_GROWTH = 64 * 2 ** 20  # the files are a few KB; the layers they could make a loader build are GB

X = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(7))


def base():
    torch.manual_seed(0)
    model = UNet(3, 1, 2, (4, 8, 8), (2, 2), num_res_units=0).eval()
    model.tcurlora_base_name = "tiny-unet"
    return model


def _randomise(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        params = list(get_adapter(model).parameters()) if not hasattr(model, "_tcurlora_lora") else \
            [p for n, p in model.named_parameters() if "lora_" in n]
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_sources")
    labels = [{"value": 1, "name": "Brain", "color": [0.9, 0.8, 0.7]},
              {"value": 2, "name": "CSF", "color": [0.1, 0.2, 0.9]}]
    configs = {
        "tcurlora": TCURLoRAConfig(rank=2),
        "head": TCURLoRAConfig(rank=2, new_head={"module": "model.2.conv", "out_channels": 3}),
        "decoder": TCURLoRAConfig(method="decoder", train_modules=[r"model\.2(\..*)?"]),
        "lora": TCURLoRAConfig(method="lora", rank=2, train_modules=[r"model\.2\.conv"]),
    }
    out = {}
    for name, config in configs.items():
        model = base()
        inject_adapter(model, config)
        _randomise(model, len(out) + 1)
        path = folder / f"{name}.safetensors"
        save_adapter(model, path, labels=labels + ([{"value": 3, "name": "Bone", "color": [1, 1, 1]}]
                                                   if name == "head" else []))
        out[name] = path.read_bytes()
    return out


# ----------------------------------------------------------------------------------------------
# mutations


NASTY = [None, True, False, 0, -1, 1, 2, 3, 7, 2 ** 31, 2 ** 40, 2 ** 63, 10 ** 7, 10 ** 30, -(10 ** 9), 0.5, 1e308,
         float("nan"), float("inf"), float("-inf"), "", "x", "x" * 2000, "a\nb", "\x1b[2J", "\u202eevil", "\ud800",
         "Läsion", "F32", "BF16", "tcurlora", "lora", "full", "decoder", "model.0.conv", "model.2.conv",
         "model.1.submodule.0.conv", "(.*.*)*X", "(a|aa)+", r"model\..*", ".*", "(", "sha256:" + "0" * 64,
         [], {}, [1], [[]], [0, 1], [1, 1], [2, 2, 2], {"module": "model.2.conv", "out_channels": 10 ** 7},
         {"module": "model.0.conv", "out_channels": 3}, {"a": 1}]
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8", "x", 4, None, ["F32"], {"F32": 1}]


def mutate_manifest(rng, manifest):
    mutate(rng, manifest, NASTY)


def mutate_header(rng, header):
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        return
    key = rng.choice(keys)
    entry = header[key]
    op = rng.choice(["dtype", "shape", "shape", "offsets", "rename", "delete", "alias", "entry"])
    if not isinstance(entry, dict):  # an earlier mutation replaced it
        op = "delete"
    if op == "dtype":
        entry["dtype"] = rng.choice(DTYPES)
    elif op == "shape" and isinstance(entry.get("shape"), list):
        shape = list(entry["shape"])
        i = rng.randrange(len(shape)) if shape else 0
        choice = rng.choice(["+1", "-1", "big", "swap", "append", "drop", "float"])
        if choice == "+1" and shape:
            shape[i] += 1
        elif choice == "-1" and shape:
            shape[i] -= 1
        elif choice == "big" and shape:
            shape[i] *= 10 ** 6
        elif choice == "swap" and len(shape) > 1:
            shape = shape[::-1]
        elif choice == "append":
            shape.append(rng.choice([1, 2, 10 ** 7]))
        elif choice == "drop" and shape:
            shape.pop()
        elif choice == "float" and shape:
            shape[i] = float(shape[i])
        entry["shape"] = shape
    elif op == "offsets" and isinstance(entry.get("data_offsets"), list):
        a, b = entry["data_offsets"]
        delta = rng.choice([-4, -1, 1, 4, 10 ** 9])
        entry["data_offsets"] = rng.choice([[a + delta, b + delta], [a, b + delta], [b, a], [a, a]])
    elif op == "rename":
        header[rng.choice([key + "x", key.replace("delta_u", "delta_v"), "stacks.x.delta_u", "trained.model__0.weight",
                           key.replace("lora_A", "lora_B")])] = header.pop(key)
    elif op == "delete":
        del header[key]
    elif op == "alias":  # a second name for the same bytes
        header[key.replace(".", "_", 1) + "_"] = dict(entry)
    else:
        header[key] = rng.choice(NASTY)


def mutate_bytes(rng, data, n):
    data = bytearray(data)
    op = rng.choice(["flip", "nan", "inf", "truncate", "append", "length"])
    body = range(8 + n, len(data)) if len(data) > 8 + n else range(len(data))
    if op == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.choice(body)
            data[i] ^= 1 << rng.randrange(8)
    elif op in ("nan", "inf"):  # a float32 NaN/inf written over an aligned value of the data
        start = 8 + n + 4 * rng.randrange(max(1, (len(data) - 8 - n) // 4))
        data[start:start + 4] = struct.pack("<f", float(op))
    elif op == "truncate":
        data = data[: rng.randrange(len(data))]
    elif op == "append":
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        data[:8] = struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, len(data), 2 ** 63]))
    return bytes(data)


def make_case(rng, sources):
    kind = rng.choice(sorted(sources))
    data = sources[kind]
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    manifest = json.loads(header["__metadata__"][METADATA_KEY])
    tensor_bytes = data[8 + n:]
    byte_ops = 0
    for _ in range(rng.randint(1, 3)):
        where = rng.choice(["manifest", "manifest", "manifest", "header", "bytes", "text"])
        if where == "manifest" and isinstance(manifest, dict):
            mutate_manifest(rng, manifest)
        elif where == "header":
            mutate_header(rng, header)
        elif where == "text":  # the manifest text itself: a stray character, or cut short
            text = manifest if isinstance(manifest, str) else json.dumps(manifest)
            i = rng.randrange(len(text))
            manifest = text[:i] + rng.choice(["", "\x00", "}", "\"", "NaN", "\n", "1e999"]) + text[i + 1:]
        else:
            byte_ops += 1
    header["__metadata__"] = {METADATA_KEY: manifest if isinstance(manifest, str) else json.dumps(manifest)}
    raw = json.dumps(header).encode()
    out = struct.pack("<Q", len(raw)) + raw + tensor_bytes
    for _ in range(byte_ops):
        out = mutate_bytes(rng, out, len(raw))
    return kind, out


# ----------------------------------------------------------------------------------------------
# the run


def _printable(text):
    return all(ch == "\n" or ch.isprintable() for ch in text)


def check_case(path, reference):
    """'refused' or 'loaded'; raises AssertionError (or anything else) for a failure."""
    try:
        manifest = read_manifest(path)
    except TCURLoRAError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(f"{path.name}: "), str(exc)
    else:
        assert _printable(summary(manifest))
    model = base()
    try:
        load_adapter(model, path, adapter_name="fuzz")
    except TCURLoRAError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(f"{path.name}: ") and _printable(message), message
        assert list_adapters(model) == [] and not hasattr(model, "_tcurlora_lora"), "a refused load left an adapter"
        with torch.no_grad():
            assert torch.equal(model(X), reference), "a refused load changed the model"
        return "refused"
    with torch.no_grad():
        out = model(X)
    assert torch.isfinite(out).all(), "a loaded adapter gives non-finite output"
    return "loaded"


def test_fuzz_adapter_files(sources, tmp_path):
    path = tmp_path / "fuzz.safetensors"
    with torch.no_grad():
        reference = base()(X)
    # warm up: the first loads import PEFT and grow the allocator; the RSS limit is for what cases add
    for data in sources.values():
        path.write_bytes(data)
        assert check_case(path, reference) == "loaded"

    def make(rng):
        kind, data = make_case(rng, sources)
        path.write_bytes(data)
        return kind, lambda: check_case(path, reference)

    result = run(SEED, CASES, TIME_BUDGET_S, CASE_TIMEOUT_S, make)
    counts = {outcome: sum(n for (_, o), n in result.counts.items() if o == outcome) for outcome in
              ("refused", "loaded")}
    failures, total, growth = result.failures, result.total, result.rss_growth
    print(f"\nfuzz: {total} cases in {result.seconds:.0f} s: {counts['refused']} refused, {counts['loaded']} loaded, "
          f"{len(failures)} failures; peak RSS growth {growth / 2 ** 20:.1f} MB")
    assert not failures, f"{len(failures)} of {total} cases failed; first:\n" + "\n".join(failures[:3])
    assert total >= min(CASES, 300), "too few cases ran to mean anything"
    assert counts["loaded"] > 0 and counts["refused"] > 0
    assert growth <= MAX_RSS_GROWTH, f"peak RSS grew by {growth / 2 ** 20:.0f} MB"
