"""Bytes a federated round sends, per method, on the real deepbet base (and the ViT-B UNETR of the paper).

Each round the server sends every site the adapter state and each site sends its state back.  Two figures:
the state's tensor data, and the bytes of the Flower ``ArrayRecord`` the federation really sends (the same
arrays as ``.npy`` with their headers, and the tensor names; HTTP/TLS framing comes on top).  Measured from
the state the adapter really has after ``inject_adapter`` (the keys ``adapter_state_dict`` returns), so the
figure follows the code.

    python benchmarks/federated_bytes.py            # writes docs/benchmarks-results/federated_bytes.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

METHODS = [("tCURLoRA r=8", {"method": "tcurlora", "rank": 8}),
           ("tCURLoRA r=8 + decoder", {"method": "tcurlora", "rank": 8, "decoder": True}),
           ("LoRA r=8 (PEFT)", {"method": "lora", "rank": 8}),
           ("decoder only", {"method": "decoder"}),
           ("full fine-tuning", {"method": "full"})]


def state_bytes_for(make_base, spec: dict) -> dict:
    from tcurlora.adapter import adapter_state_dict, inject_adapter
    from tcurlora.config import TCURLoRAConfig
    from tcurlora.federated import state_bytes, to_record

    base = make_base()
    network, decoder = base if isinstance(base, tuple) else (base.network, base.decoder_modules)
    train = list(decoder) if spec.get("decoder") or spec["method"] == "decoder" else []
    config = TCURLoRAConfig(method=spec["method"], rank=spec.get("rank", 8), train_modules=train)
    inject_adapter(network, config, "federated")
    state = adapter_state_dict(network)
    return {"tensors": len(state), "values": int(sum(t.numel() for t in state.values())), "bytes": state_bytes(state),
            "record_bytes": to_record(state).count_bytes()}


def unetr_vitb():
    from monai.networks.nets import UNETR

    sys.path.insert(0, str(HERE))
    from resources import UNETR_DECODER

    return UNETR(1, 2, (96, 96, 96), feature_size=16, hidden_size=768, mlp_dim=3072, num_heads=12), UNETR_DECODER


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "benchmarks-results"))
    parser.add_argument("--sites", type=int, default=3, help="sites in the example round (default 3)")
    args = parser.parse_args(argv)
    from tcurlora.models import load_base

    rows = []
    for model, make in (("deepbet (LinkNet3d)", lambda: load_base("deepbet")), ("UNETR ViT-B (paper)", unetr_vitb)):
        for label, spec in METHODS:
            size = state_bytes_for(make, spec)
            rows.append({"model": model, "method": label, **size,
                         "round_bytes_all_sites": 2 * args.sites * size["record_bytes"]})
            print(f"{model:22s} {label:24s} {size['values']:>12,} values  {size['bytes']:>14,} B per site each way "
                  f"({size['record_bytes']:,} B as Flower's ArrayRecord)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "federated_bytes.json").write_text(json.dumps({"sites": args.sites, "rows": rows}, indent=1))
    lines = [f"| model | method | trained values | bytes per site, each way | as Flower's ArrayRecord | "
             f"one round, {args.sites} sites (both ways) |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['values']:,} | {_human(r['bytes'])} | "
                     f"{_human(r['record_bytes'])} (+{100 * (r['record_bytes'] / r['bytes'] - 1):.2f} %) | "
                     f"{_human(r['round_bytes_all_sites'])} |")
    (out / "federated_bytes.md").write_text("\n".join(lines) + "\n")
    return 0


def _human(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


if __name__ == "__main__":
    sys.exit(main())
