"""The paper's comparison on our task: every method at matched trainable-value budgets, each at the learning
rate it does best with on a validation split, several seeds, Dice and HD95 per held-out case.

Task: ``quality.py``'s (the demo's site convention on two real heads), on deepbet at 128³ or on the distilled
UNETR (``vit_base.py``, ViT stacks; also the paper's own setting, ViT stacks + the conv decoder).  Splits, per
direction (train on one head, test on the other):

* training: the training head's left hemisphere (the mask's bounding-box centre on the left-right axis);
  the right hemisphere is labelled ``ignore`` (tcurlora's partial-annotation label), so it never enters the loss;
* validation: Dice on that right hemisphere of the training head (what selects the learning rate);
* test: Dice and HD95 on the other head (never seen by training or selection).

Protocol: (1) every method at each multiple of its default learning rate (``--lr-scales``, default 1, 3, 10;
while the highest rate tried wins, also 3× and 9× that), seed 0, both directions; (2) per method the rate with
the best mean validation Dice over the two directions; (3) seeds 0, 1, 2 at that rate (seed 0 is the sweep's
run).  The table reports the test Dice of (3).

    python benchmarks/comparison.py                   # deepbet: 140 runs, ≈ 30 min on one core
    python benchmarks/comparison.py --base unetr      # builds the distilled UNETR first (≈ 12 min) if needed
    python benchmarks/comparison.py --report          # tables and plots from the runs so far

Runs are appended to ``comparison[_unetr]_runs.jsonl`` and skipped when already there for the same base weights
(resumable); the tables show the runs of the weights recorded last.
Two templates, not a cohort: the numbers compare methods on one task and validate nothing clinically.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from quality import (BASELINE_NAMES, DIRECTIONS, HERE, adapt_and_segment, latest_weights, load_benchmark_base,
                     site_labels, weights_tag)
from resources import UNETR_DECODER

IGNORE_VALUE = 2
ZERO_SHOT = "zero-shot"

def rows_for(base: str) -> list:
    """(budget, row label, FinetuneOptions kwargs) in table order.

    tCURLoRA and CURLoRA hold r² values per stack member, the LoRA family and LoRA-PT r·(n1 + n2): on deepbet
    (conv stacks) the budgets meet at ≈ 2 k (CUR methods r = 8), ≈ 20–27 k (CUR methods r = 32, the others
    r = 1) and ≈ 200 k (the others r = 8).  On the UNETR (ViT stacks, where the LoRA family cannot go below
    r = 1 of the 48 linears) the CUR methods at r = 8 face the others at r = 1, plus the paper's own setting:
    tCURLoRA on the ViT with the conv decoder trained fully.  Decoder-only and full fine-tuning are references.
    """
    names = BASELINE_NAMES
    if base == "unetr":
        vit = {"preset": "vit"}
        return ([("CUR r = 8", f"{names[m]} r=8 (vit)", {"method": m, "rank": 8, **vit}) for m in ("tcurlora", "curlora")]
                + [("others r = 1", f"{names[m]} r=1 (vit)", {"method": m, "rank": 1, **vit})
                   for m in ("lora", "pissa", "dora", "lorapt")]
                + [("paper's setting", "tCURLoRA r=8 (vit) + decoder",
                    {"method": "tcurlora", "rank": 8, "train_modules": UNETR_DECODER, **vit}),
                   ("reference", "decoder-only", {"method": "decoder", "train_modules": UNETR_DECODER}),
                   ("reference", "full fine-tuning", {"method": "full"})])
    return ([("≈ 2 k", f"{names[m]} r=8", {"method": m, "rank": 8}) for m in ("tcurlora", "curlora")]
            + [("≈ 20–27 k", f"{names[m]} r=32", {"method": m, "rank": 32}) for m in ("tcurlora", "curlora")]
            + [("≈ 20–27 k", f"{names[m]} r=1", {"method": m, "rank": 1}) for m in ("lora", "pissa", "dora", "lorapt")]
            + [("≈ 200 k", f"{names[m]} r=8", {"method": m, "rank": 8}) for m in ("lora", "pissa", "dora", "lorapt")]
            + [("50 k", "decoder-only", {"method": "decoder"}), ("2.1 M", "full fine-tuning", {"method": "full"})])


def half_labelled(work: Path, name: str, label_path: str) -> tuple:
    """The training label with its right hemisphere set to ``ignore``; returns (file, right-half mask)."""
    import SimpleITK as sitk

    out = work / f"{name}_left_half.nii.gz"
    label = sitk.ReadImage(label_path)
    arr = sitk.GetArrayFromImage(label).astype(np.uint8)  # z, y, x: x is left-right on these heads
    xs = np.nonzero(arr.any(axis=(0, 1)))[0]
    mid = (int(xs.min()) + int(xs.max()) + 1) // 2
    right = np.zeros(arr.shape, bool)
    right[:, :, mid:] = True
    if not out.is_file():
        half = np.where(right, IGNORE_VALUE, arr).astype(np.uint8)
        img = sitk.GetImageFromArray(half)
        img.CopyInformation(label)
        sitk.WriteImage(img, str(out))
    return str(out), right


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    denom = int(pred.sum()) + int(ref.sum())
    return 1.0 if denom == 0 else 2.0 * int((pred & ref).sum()) / denom


def run(args) -> None:
    import SimpleITK as sitk

    from tcurlora.metrics import evaluate
    from tcurlora.events import Events
    from tcurlora.infer import segment
    from tcurlora.protocol import DEFAULT_LR, MAX_STEPS
    from tcurlora.train import FinetuneOptions

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_file = runs_path(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cases = site_labels(work / "data")
    base = load_benchmark_base(args.base, args.resolution, Path(args.unetr_spec) if args.unetr_spec else None)
    resolution = args.resolution if args.base == "deepbet" else int(base.preprocessing.patch_size[0])
    pristine = copy.deepcopy(base.network)
    weights = weights_tag(pristine)
    done = {(r.get("weights"), r["method"], r["lr_scale"], r["train"], r["seed"]): r for r in read_runs(runs_file)}
    labels = [dict(l) for l in base.labels] + [{"value": IGNORE_VALUE, "name": "ignore"}]
    halves = {name: half_labelled(work / "data", name, cases[name][1]) for name in cases}

    def one(label, kwargs, scale, seed, train, test):
        key = (weights, label, scale, train, seed)
        if key in done:
            return done[key]
        tag = "".join(c if c.isalnum() else "_" for c in f"{label}_lr{scale:g}_{train}_s{seed}")
        val_seg, test_seg = work / f"{tag}_val.nii.gz", work / f"{tag}_test.nii.gz"
        half_file, right = halves[train]
        jobs = [(cases[train][0], val_seg), (cases[test][0], test_seg)]
        if kwargs is None:  # zero-shot: the base as it is
            lr, got = None, {"trainable": 0, "adapter_bytes": 0, "train_s": 0.0, "final_loss": None}
            for image, seg in jobs:
                base.network = copy.deepcopy(pristine)
                segment(base, [image], str(seg), device="cpu", tta=False, events=Events())
        else:
            lr = DEFAULT_LR[kwargs["method"]] * scale
            options = FinetuneOptions(steps=args.steps, batch_size=1, seed=seed, device="cpu", val_every=MAX_STEPS,
                                      lr=lr, **kwargs)
            got = adapt_and_segment(base, pristine, (cases[train][0], half_file), options, jobs, labels=labels)
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(val_seg))) > 0
        ref = sitk.GetArrayFromImage(sitk.ReadImage(cases[train][1])) > 0
        m = evaluate([str(test_seg)], [cases[test][1]])[0]
        row = {"weights": weights, "method": label, "lr_scale": scale, "lr": lr, "train": train, "test": test, "seed": seed,
               "steps": args.steps, "resolution": resolution, "val_dice": dice(pred & right, ref & right),
               "dice": m["dice"], "hd95_mm": m["hd95_mm"], "trainable": got["trainable"],
               "adapter_bytes": got["adapter_bytes"], "train_s": round(got["train_s"], 1),
               "final_loss": got["final_loss"]}
        with open(runs_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        done[key] = row
        for p in (val_seg, test_seg):
            p.unlink(missing_ok=True)
        print(f"  {label:24s} lr×{scale:<4g} {train:>6s}->{test:6s} seed {seed}: val {row['val_dice']:.3f}  "
              f"test {row['dice']:.3f}  HD95 {row['hd95_mm']:6.2f} mm  {row['train_s']:5.0f} s", flush=True)
        return row

    for train, test in DIRECTIONS:
        one(ZERO_SHOT, None, 0.0, 0, train, test)
    rows = [r for r in rows_for(args.base) if not args.methods or any(m in r[1] for m in args.methods)]
    for _, label, kwargs in rows:  # (1) the sweep, widened upwards while the top rate wins
        scales = list(args.lr_scales)
        for scale in scales:
            for train, test in DIRECTIONS:
                one(label, kwargs, scale, 0, train, test)
            sweep = [r for r in done.values() if r["method"] == label and r["seed"] == 0]
            if scale == scales[-1] and chosen_scale(sweep) == scale and len(scales) < len(args.lr_scales) + args.widen:
                scales.append(scale * WIDEN)
    for _, label, kwargs in rows:  # (2) choose, (3) seeds
        scale = chosen_scale([r for r in done.values() if r["method"] == label and r["seed"] == 0])
        for seed in args.seeds:
            for train, test in DIRECTIONS:
                one(label, kwargs, scale, seed, train, test)


def runs_path(args) -> Path:
    return Path(args.out) / ("comparison_runs.jsonl" if args.base == "deepbet" else f"comparison_{args.base}_runs.jsonl")


def read_runs(path: Path) -> list:
    """The runs of the base weights recorded last (a rebuilt distilled UNETR starts its tables afresh)."""
    return latest_weights([json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else [],
                          group=lambda r: None)


#: When the highest rate tried wins, the sweep goes on upwards by this factor (at most ``--widen`` times).
WIDEN = 3.0


def chosen_scale(sweep: list) -> float:
    """The learning-rate multiple with the best mean validation Dice over the directions (seed 0; only rates
    run in both directions count)."""
    means = {}
    for s in sorted({r["lr_scale"] for r in sweep}):
        v = [r["val_dice"] for r in sweep if r["lr_scale"] == s]
        if len(v) == len(DIRECTIONS):
            means[s] = statistics.mean(v)
    return max(means, key=means.get)


def report(args) -> str:
    """comparison.md and the two plots, from every run recorded."""
    runs = read_runs(runs_path(args))
    scales = sorted({r["lr_scale"] for r in runs if r["method"] != ZERO_SHOT})
    lines = ["**Learning-rate sweep** (seed 0; validation Dice = the training head's unseen right hemisphere, "
             "mean of the two directions; ← the rate chosen; – not run: the sweep goes above × "
             f"{max(args.lr_scales):g} only while the highest rate wins)", "",
             "| method | " + " | ".join(f"lr × {s:g}" for s in scales) + " |",
             "|---|" + "---|" * len(scales)]
    summary = []
    for budget, label, kwargs in [("0", ZERO_SHOT, None)] + rows_for(args.base):
        sweep = [r for r in runs if r["method"] == label and r["seed"] == 0]
        if not sweep:
            continue
        scale = chosen_scale(sweep)
        if kwargs is not None:
            cells = []
            for s in scales:
                v = [r["val_dice"] for r in sweep if r["lr_scale"] == s]
                lr = next((r["lr"] for r in sweep if r["lr_scale"] == s), None)
                cells.append(f"{statistics.mean(v):.3f} ({lr:.0e})" + (" ←" if s == scale else "") if v else "–")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        final = [r for r in runs if r["method"] == label and r["lr_scale"] == scale]
        d = [r["dice"] for r in final]
        summary.append({
            "budget": budget, "method": label, "lr": final[0]["lr"], "runs": len(final),
            "seeds": sorted({r["seed"] for r in final}), "dice_mean": statistics.mean(d),
            "dice_sd": statistics.stdev(d) if len(d) > 1 else 0.0,
            "dice_robex": statistics.mean([r["dice"] for r in final if r["test"] == "robex"] or [float("nan")]),
            "dice_mni152": statistics.mean([r["dice"] for r in final if r["test"] == "mni152"] or [float("nan")]),
            "hd95_mean": statistics.mean(r["hd95_mm"] for r in final),
            "hd95_sd": statistics.stdev([r["hd95_mm"] for r in final]) if len(final) > 1 else 0.0,
            "val_dice": statistics.mean(r["val_dice"] for r in final),
            "trainable": final[0]["trainable"], "adapter_kb": final[0]["adapter_bytes"] / 1024,
            "train_s": statistics.median(r["train_s"] for r in final)})
    lines += ["", "**Test** (the other head; runs = 2 directions × seeds, at the chosen rate)", "",
              "| budget | method | lr | runs | Dice mean ± sd | Dice, test robex | Dice, test mni152 | HD95 mm mean ± sd "
              "| validation Dice | trainable values | adapter file | train time (median) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        trained = s["trainable"] > 0
        lr, size, t = ((f"{s['lr']:.0e}", f"{s['adapter_kb']:,.1f} KB", f"{s['train_s']:.0f} s") if trained
                       else ("–", "–", "–"))
        lines.append(f"| {s['budget']} | {s['method']} | {lr} | {s['runs']} | {s['dice_mean']:.3f} ± "
                     f"{s['dice_sd']:.3f} | {s['dice_robex']:.3f} | {s['dice_mni152']:.3f} | {s['hd95_mean']:.2f} ± "
                     f"{s['hd95_sd']:.2f} | {s['val_dice']:.3f} | {s['trainable']:,d} | {size} | {t} |")
    text = "\n".join(lines) + "\n"
    out, stem = Path(args.out), "comparison" if args.base == "deepbet" else f"comparison_{args.base}"
    steps, res = runs[0]["steps"], runs[0]["resolution"]
    text = f"{args.base} at {res}³, {steps} steps, batch 1\n\n" + text
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}_summary.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out, stem, f"{args.base} {res}³, {steps} steps, learning rate chosen on validation")
    return text


def plot(summary: list, out: Path, stem: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    family = {"tCURLoRA": "tab:red", "CURLoRA": "tab:orange", "LoRA (PEFT)": "tab:blue", "PiSSA (PEFT)": "tab:cyan",
              "DoRA (PEFT)": "tab:purple", "LoRA-PT (t-SVD)": "tab:green"}
    for key, xlabel, name in (("trainable", "trainable values (log)", f"{stem}_dice_vs_trainable.png"),
                              ("train_s", "training time, median s (one CPU thread)", f"{stem}_dice_vs_time.png")):
        fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=100)
        for s in summary:
            if not s["trainable"]:
                ax.axhline(s["dice_mean"], ls="--", lw=0.9, color="grey", label="zero-shot")
                continue
            colour = next((c for f, c in family.items() if s["method"].startswith(f + " ")), "black")
            marker = ("P" if "+ decoder" in s["method"] else "o" if "r=8" in s["method"] else "s" if "r=32" in s["method"]
                      else "^" if "r=1" in s["method"] else "D")
            ax.errorbar(s[key], s["dice_mean"], yerr=s["dice_sd"], fmt=marker, color=colour, capsize=3,
                        label=f"{s['method']} (lr {s['lr']:.0e})")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test Dice (mean ± sd, 2 directions × seeds)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", choices=["deepbet", "unetr"], default="deepbet")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=128, help="deepbet's model input")
    parser.add_argument("--unetr-spec", help="the distilled UNETR's spec (default: build or reuse benchmarks/vit_base.py's)")
    parser.add_argument("--lr-scales", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--widen", type=int, default=2,
                        help="while the highest rate tried wins, try up to this many higher ones (×3 each)")
    parser.add_argument("--methods", nargs="*", help="only rows whose label contains one of these strings")
    parser.add_argument("--report", action="store_true", help="only write the tables and plots")
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "benchmarks-results"))
    parser.add_argument("--work", default=None, help="adapters and segmentations (default: cache)")
    args = parser.parse_args(argv)
    if args.work is None:
        from tcurlora.fetch import cache_dir

        args.work = str(cache_dir() / "benchmarks" / "work" / f"comparison_{args.base}")
    if args.base == "unetr" and not args.unetr_spec and not args.report:
        import vit_base

        args.unetr_spec = str(vit_base.build(vit_base.default_dir()))
    if not args.report:
        run(args)
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
