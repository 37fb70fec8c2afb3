"""Federated quality row: two sites (the two real heads) federated, against each site alone and pooled.

The task is the demo's and benchmarks/quality.py's: deepbet (model input 128³) adapted to the site brain-mask
convention (expert masks grown by 3 mm).  Site A holds mni152, site B holds robex, one case each.  Every
configuration trains tCURLoRA r=8 for the same number of steps per site (``rounds × local_steps``):

* site A alone, site B alone: ``finetune`` on the site's own case;
* pooled: ``finetune`` on both cases (what a central data set would give);
* federated: ``rounds`` rounds; each site runs ``local_steps`` of ``finetune`` from the global cores
  (:func:`tcurlora.federated.client.train_round`, the site code) and the global cores become the case-weighted
  mean (:func:`tcurlora.aggregate.weighted_mean`, the server code).  The rounds run in this one process: the
  arithmetic is the Flower federation's (Testing/test_federated.py checks the server's result equals this mean),
  without the transport.

Dice is measured on both heads (``tcurlora.metrics.evaluate``): for a site alone the other head is held out;
federated and pooled have trained on one case of each head.  Two heads, not a cohort: this compares training
set-ups on one task and validates nothing clinically.

    python benchmarks/federated_quality.py --rounds 3 --local-steps 8 --seeds 0 1
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from quality import load_benchmark_base, site_labels  # noqa: E402

SITES = {"A": "mni152", "B": "robex"}


def run(args) -> list:
    from tcurlora.adapter_file import base_fingerprint
    from tcurlora.aggregate import read_adapter, weighted_mean, write_adapter_tensors
    from tcurlora.events import Events
    from tcurlora.federated.client import train_round
    from tcurlora.federated.server import TRAIN_KEYS, initial_adapter
    from tcurlora.infer import segment
    from tcurlora.metrics import evaluate
    from tcurlora.train import FinetuneOptions, finetune

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cases = site_labels(work / "data")
    base = load_benchmark_base("deepbet", args.resolution)
    pristine = copy.deepcopy(base.network)
    fingerprint = base_fingerprint(pristine)
    steps = args.rounds * args.local_steps

    def fresh():
        base.network = copy.deepcopy(pristine)
        return base

    def score(adapter: Path, label: str, seed: int, seconds: float) -> list:
        rows = []
        for site, head in SITES.items():
            image, reference = cases[head]
            seg = work / f"{adapter.stem}_on_{head}.nii.gz"
            segment(fresh(), [image], str(seg), adapter=str(adapter), device="cpu", tta=False, events=Events())
            m = evaluate([str(seg)], [reference])[0]
            rows.append({"setup": label, "seed": seed, "test": head, "dice": m["dice"], "hd95_mm": m["hd95_mm"],
                         "steps_per_site": steps, "rounds": args.rounds, "local_steps": args.local_steps,
                         "train_s": round(seconds, 1), "resolution": args.resolution})
            print(f"  {label:18s} seed {seed} on {head:6s}: Dice {m['dice']:.3f}  HD95 {m['hd95_mm']:6.2f} mm", flush=True)
        return rows

    rows = []
    for seed in args.seeds:
        options = FinetuneOptions(method="tcurlora", rank=8, preset="conv", steps=steps, batch_size=args.batch,
                                  seed=seed, device="cpu")
        for label, heads in (("site A alone", ["A"]), ("site B alone", ["B"]), ("pooled", ["A", "B"])):
            out = work / f"{label.replace(' ', '_')}_s{seed}.safetensors"
            t0 = time.time()
            finetune(fresh(), [cases[SITES[h]] for h in heads], out, options=options, events=Events())
            rows += score(out, label, seed, time.time() - t0)

        # federated: the server's round-0 adapter, then rounds of site training and case-weighted averaging
        out = work / f"federated_s{seed}.safetensors"
        local = FinetuneOptions(**{**options.to_dict(), "steps": args.local_steps})
        manifest, state = read_adapter(initial_adapter(fresh(), local, None, out))
        train = {k: getattr(local, k) for k in TRAIN_KEYS if k != "labels"}
        train.update(patch_size=None, labels=manifest["labels"])
        t0 = time.time()
        for r in range(1, args.rounds + 1):
            updates = []
            for site, head in SITES.items():
                site_out = work / f"federated_s{seed}_site{site}.safetensors"
                _, site_state = train_round(fresh, [cases[head]], site_out, r, train, state, fingerprint,
                                            seed=seed, device="cpu", events=Events())
                updates.append(site_state)
            state = weighted_mean(updates, [1, 1], list(SITES))
        write_adapter_tensors(out, manifest, state)
        rows += score(out, f"federated ({args.rounds}×{args.local_steps})", seed, time.time() - t0)
    return rows


def write(rows: list, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "federated_quality.json").write_text(json.dumps(rows, indent=1))
    lines = [f"deepbet (model input {rows[0]['resolution']}³), tCURLoRA r=8 (conv), {rows[0]['steps_per_site']} "
             f"steps per site, seeds {sorted({r['seed'] for r in rows})}; mean Dice (HD95 mm) per test head", "",
             "| setup | trained on | Dice on mni152 | Dice on robex | mean Dice |", "|---|---|---:|---:|---:|"]
    trained = {"site A alone": "mni152", "site B alone": "robex", "pooled": "both (one place)"}
    for setup in dict.fromkeys(r["setup"] for r in rows):
        sub = [r for r in rows if r["setup"] == setup]
        cell = {}
        for head in ("mni152", "robex"):
            d = [r["dice"] for r in sub if r["test"] == head]
            h = [r["hd95_mm"] for r in sub if r["test"] == head]
            cell[head] = f"{statistics.mean(d):.3f} ({statistics.mean(h):.1f})"
        lines.append(f"| {setup} | {trained.get(setup, 'both (federated, no scan moved)')} | {cell['mni152']} | "
                     f"{cell['robex']} | {statistics.mean(r['dice'] for r in sub):.3f} |")
    text = "\n".join(lines) + "\n"
    (out / "federated_quality.md").write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "benchmarks-results"))
    parser.add_argument("--work", default=None, help="adapters and segmentations (default: cache)")
    args = parser.parse_args(argv)
    if args.work is None:
        from tcurlora.fetch import cache_dir

        args.work = str(cache_dir() / "benchmarks" / "work" / "federated")
    print(write(run(args), Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
