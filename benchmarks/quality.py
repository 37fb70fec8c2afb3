"""Quality benchmark: adapt a pretrained base to the site convention on one real head, test on the other.

The task is the demo's (tcurlora/demo.py): a site's brain masks are the expert masks grown by 3 mm
(``tcurlora.demo.site_convention``).  Two real heads with expert masks: mni152 (FSL MNI152 T1, 1 mm)
and robex (ROBEX reference T1, 1.5 mm).  Leave-one-case-out in both directions (train on one, test on
the other), every method with the same case, steps, batch and seeds; each method keeps the package's
default learning rate (``tcurlora.protocol.DEFAULT_LR``).  Per test case: Dice and HD95 on the input grid
(``tcurlora.metrics.evaluate``); per method: trainable values and adapter file size.

    python benchmarks/quality.py --base deepbet --steps 24 --seeds 0 1 2 --resolution 128
    python benchmarks/quality.py --base unetr --steps 24 --seeds 0 1 2

Two templates, not a cohort: the numbers compare methods on one task, they validate nothing clinically.
Runs are appended to ``<out>/quality_runs.jsonl`` and skipped when already there for the same base weights
(resumable); the tables show the runs of the weights recorded last for each base.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

from resources import UNETR_DECODER  # benchmarks/ is on sys.path when run as a script

HERE = Path(__file__).resolve().parent
DIRECTIONS = [("mni152", "robex"), ("robex", "mni152")]


def methods_for(base: str) -> list:
    """(label, FinetuneOptions kwargs or None for zero-shot) in table order."""
    preset = "conv" if base == "deepbet" else "vit"
    rows = [("zero-shot", None)]
    rows += [(f"tCURLoRA r={r} ({preset})", {"method": "tcurlora", "rank": r, "preset": preset}) for r in (1, 4, 8)]
    if base == "unetr":  # the ViT stacks leave the conv decoder frozen: also its conv stacks, and the paper's setting
        rows += [("tCURLoRA r=8 (conv)", {"method": "tcurlora", "rank": 8, "preset": "conv"}),
                 ("tCURLoRA r=8 (vit) + decoder", {"method": "tcurlora", "rank": 8, "preset": "vit",
                                                   "train_modules": UNETR_DECODER})]
    if base == "deepbet":  # --preset decoder: the decoder's conv stacks only (faster steps)
        rows += [(f"tCURLoRA r={r} (decoder)", {"method": "tcurlora", "rank": r, "preset": "decoder"}) for r in (8, 16)]
    rows += [("LoRA r=8 (PEFT)", {"method": "lora", "rank": 8, "preset": preset}),
             ("decoder-only", {"method": "decoder"}),
             ("full fine-tuning", {"method": "full"})]
    return rows + baseline_rows(preset)


# The paper's other baselines at matched trainable-value budgets (see ``budget_table``): on deepbet the
# PEFT methods cannot go below r = 1 (≈ 25k values), tCURLoRA/CURLoRA r = 8 hold 2,036, so three budgets:
# ≈ 2k (CUR methods r = 8), ≈ 20–27k (every method: CUR r = 32, the LoRA family r = 1) and ≈ 200k (LoRA r = 8).
BASELINE_RANKS = {"curlora": (8, 32), "tcurlora": (32,), "lora": (1,), "pissa": (1, 8), "dora": (1, 8),
                  "lorapt": (1, 8)}
BASELINE_NAMES = {"curlora": "CURLoRA", "tcurlora": "tCURLoRA", "lora": "LoRA (PEFT)", "pissa": "PiSSA (PEFT)",
                  "dora": "DoRA (PEFT)", "lorapt": "LoRA-PT (t-SVD)"}


def baseline_rows(preset: str) -> list:
    return [(f"{BASELINE_NAMES[m]} r={r}" + (f" ({preset})" if m == "tcurlora" else ""),
             {"method": m, "rank": r, "preset": preset}) for m, ranks in BASELINE_RANKS.items() for r in ranks]


def budget_table(base_name: str, ranks=(1, 2, 4, 8, 16, 32), resolution: int = 128, unetr_spec=None) -> str:
    """Markdown: trainable values of every method at each rank on ``base_name`` (injection only, no training)."""
    from tcurlora import TCURLoRAConfig, inject_adapter, trainable_parameter_count

    base = load_benchmark_base(base_name, resolution, unetr_spec)
    preset = "conv" if base_name == "deepbet" else "vit"
    lines = [f"Trainable values per method and rank on **{base_name}** (preset `{preset}`; "
             f"{sum(p.numel() for p in base.network.parameters()):,} base weights)", "",
             "| method | " + " | ".join(f"r={r}" for r in ranks) + " |", "|---|" + "---|" * len(ranks)]
    for method in ("tcurlora", "curlora", "lorapt", "lora", "pissa", "dora"):
        counts = []
        for r in ranks:
            network = copy.deepcopy(base.network)
            inject_adapter(network, TCURLoRAConfig(method=method, rank=r, preset=preset))
            counts.append(f"{trainable_parameter_count(network):,}")
        lines.append(f"| {BASELINE_NAMES.get(method, method)} | " + " | ".join(counts) + " |")
    return "\n".join(lines) + "\n"


def load_benchmark_base(name: str, resolution: int = 128, unetr_spec: Path = None):
    from tcurlora.models import load_base

    if name == "deepbet":
        base = load_base("deepbet")
        if resolution != 256:  # as tcurlora/demo.py --quick does
            size = (resolution,) * 3
            base.resize_to = size
            base.inference_roi = size
            base.preprocessing = type(base.preprocessing).from_dict({**base.preprocessing.to_dict(),
                                                                     "patch_size": list(size)})
        return base
    if name == "unetr":
        return load_base(str(unetr_spec))
    raise SystemExit(f"unknown base {name}")


def weights_tag(network) -> str:
    """12 hex digits of the base's weights fingerprint (the one adapter files record)."""
    from tcurlora import base_fingerprint

    return base_fingerprint(network).split(":", 1)[1][:12]


def latest_weights(rows: list, group=lambda r: r.get("base")) -> list:
    """The rows made with the weights recorded last for their base. Runs are resumed and tabulated per weights:
    the distilled UNETR and the nnU-Net bases are built here, and a rebuilt one must not mix with the runs of
    the build before it."""
    latest = {group(r): r.get("weights") for r in rows}
    return [r for r in rows if r.get("weights") == latest[group(r)]]


def site_labels(work: Path) -> dict:
    from tcurlora.datasets import get_scan
    from tcurlora.demo import SITE_MARGIN_MM, site_convention

    work.mkdir(parents=True, exist_ok=True)
    cases = {}
    for name in ("mni152", "robex"):
        image, mask = get_scan(name)
        label = work / f"{name}_site_{SITE_MARGIN_MM:g}mm.nii.gz"
        if not label.is_file():
            site_convention(str(image), str(mask), label)
        cases[name] = (str(image), str(label))
    return cases


def adapt_and_segment(base, pristine, train_pair, options, jobs, labels=None, **segment_options) -> dict:
    """Train ``options`` on ``train_pair`` from a copy of ``pristine`` (the adapter is written beside the first
    output), then segment each ``(image, output)`` of ``jobs`` with it (``segment_options`` go to ``segment``).
    Returns train seconds, segment seconds per job, trainable values, adapter bytes and the final loss;
    ``base.network`` and ``base.labels`` are left as they were (a pristine copy). Segmentation does not mirror
    unless ``segment_options`` ask (``tta``): every recorded table was measured so, whatever the base's default."""
    import torch

    segment_options.setdefault("tta", False)

    from tcurlora.adapter_file import load_adapter
    from tcurlora.events import Events
    from tcurlora.infer import segment
    from tcurlora.protocol import PEFT_METHODS
    from tcurlora.train import finetune

    adapter = Path(jobs[0][1]).with_name(Path(jobs[0][1]).name.replace(".nii.gz", ".safetensors"))
    base.network = copy.deepcopy(pristine)
    torch.manual_seed(options.seed)  # finetune injects (PEFT LoRA init) before it seeds: make that reproducible
    t0 = time.time()
    result = finetune(base, [train_pair], adapter, options=options, labels=labels, events=Events())
    train_s = time.time() - t0
    result.files.checkpoint.unlink(missing_ok=True)  # resume state only (~3× the weights for full)
    base_labels, seg_s = base.labels, []
    try:
        for image, out in jobs:
            base.network = copy.deepcopy(pristine)
            t0 = time.time()
            if options.method in PEFT_METHODS:
                # PEFT's layers run unmerged (tcurlora.infer does the same): load the file ourselves, and with
                # it the adapter's labels (a new head's), which segment reads from the base
                base.labels = load_adapter(base.network, str(adapter), adapter_name="segment")["labels"]
                segment(base, [image], str(out), device="cpu", events=Events(), **segment_options)
            else:
                segment(base, [image], str(out), adapter=str(adapter), device="cpu", events=Events(), **segment_options)
            seg_s.append(time.time() - t0)
    finally:
        base.network, base.labels = copy.deepcopy(pristine), base_labels
    return {"train_s": train_s, "segment_s": seg_s, "trainable": result.metrics.trainable_values,
            "adapter_bytes": adapter.stat().st_size, "final_loss": result.metrics.final_loss}


def run(args) -> list:
    from tcurlora.events import Events
    from tcurlora.infer import segment
    from tcurlora.metrics import evaluate
    from tcurlora.protocol import DEFAULT_LR, MAX_STEPS
    from tcurlora.train import FinetuneOptions

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) / args.base
    work.mkdir(parents=True, exist_ok=True)
    runs_file = out / "quality_runs.jsonl"
    done = {}
    if runs_file.is_file():
        for line in runs_file.read_text().splitlines():
            r = json.loads(line)
            done[(r["base"], r.get("weights"), r["method"], r["train"], r["test"], r["seed"], r["steps"],
                  r["resolution"])] = r
    cases = site_labels(Path(args.work) / "data")
    spec = None
    if args.base == "unetr":
        spec = Path(args.unetr_spec)
    base = load_benchmark_base(args.base, args.resolution, spec)
    resolution = args.resolution if args.base == "deepbet" else int(base.preprocessing.patch_size[0])
    pristine = copy.deepcopy(base.network)
    weights = weights_tag(pristine)
    directions = DIRECTIONS[:args.directions]
    rows = []

    def record(row):
        rows.append(row)
        with open(runs_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"  {row['base']:8s} {row['method']:24s} {row['train']:>6s}->{row['test']:6s} seed {row['seed']}: "
              f"Dice {row['dice']:.3f}  HD95 {row['hd95_mm']:6.2f} mm  trainable {row['trainable']:>9,d}  "
              f"file {row['adapter_bytes'] / 1024:8.1f} KB  train {row['train_s']:5.0f} s", flush=True)

    for label, kwargs in methods_for(args.base):
        if args.methods and not any(m in label for m in args.methods):
            continue
        if args.lr_scale != 1:  # a learning-rate sensitivity row: its own label, so its own runs
            if kwargs is None:
                continue
            label = f"{label} lr×{args.lr_scale:g}"
            kwargs = {**kwargs, "lr": DEFAULT_LR[kwargs["method"]] * args.lr_scale}
        for train, test in directions:
            seeds = [None] if kwargs is None else args.seeds
            for seed in seeds:
                key = (args.base, weights, label, train if kwargs else "-", test, seed if seed is not None else -1,
                       0 if kwargs is None else args.steps, resolution)
                if key in done:
                    rows.append(done[key])
                    continue
                test_img, test_label = cases[test]
                tag = "".join(c if c.isalnum() else "_" for c in label)
                seg = work / f"{tag}_{train}_to_{test}_s{seed}.nii.gz"
                train_s, trainable, size, lr, final_loss = 0.0, 0, 0, None, None
                base.network = copy.deepcopy(pristine)
                if kwargs is None:
                    t0 = time.time()
                    segment(base, [test_img], str(seg), device="cpu", tta=False, events=Events())
                    seg_s = time.time() - t0
                else:
                    options = FinetuneOptions(steps=args.steps, batch_size=args.batch, seed=seed, device="cpu",
                                              val_every=MAX_STEPS, **kwargs)  # no validation case: never
                    got = adapt_and_segment(base, pristine, cases[train], options, [(test_img, seg)])
                    train_s, (seg_s,), trainable, size, final_loss = (got[k] for k in (
                        "train_s", "segment_s", "trainable", "adapter_bytes", "final_loss"))
                    lr = kwargs.get("lr", DEFAULT_LR[kwargs["method"]])
                m = evaluate([str(seg)], [test_label])[0]
                record({"base": args.base, "weights": weights, "method": label, "train": train if kwargs else "-",
                        "test": test, "seed": seed if seed is not None else -1, "steps": 0 if kwargs is None else args.steps,
                        "batch": args.batch, "lr": lr, "resolution": resolution, "dice": m["dice"],
                        "hd95_mm": m["hd95_mm"], "trainable": trainable, "adapter_bytes": size,
                        "train_s": round(train_s, 1), "segment_s": round(seg_s, 1), "final_loss": final_loss})
                # zero-shot does not depend on the training case: one run per test case covers both directions
    return rows


def settings(rows: list) -> list:
    """One block per base and training setting (steps, batch, resolution): its trained runs plus the
    zero-shot runs at that resolution.  Returns [(title, rows)] in the order first seen."""
    seen = []
    for r in rows:
        if r["steps"] and (r["base"], r["steps"], r["batch"], r["resolution"]) not in seen:
            seen.append((r["base"], r["steps"], r["batch"], r["resolution"]))
    blocks = []
    for base, steps, batch, res in seen:
        sub = [r for r in rows if r["base"] == base and r["resolution"] == res
               and (r["steps"] == 0 or (r["steps"], r["batch"]) == (steps, batch))]
        blocks.append((f"{base}, {steps} steps", sub))
    return blocks


def summarise(rows: list) -> list:
    """Per setting and method: Dice mean ± sd over all (direction, seed) runs, per direction, HD95, size."""
    out = []
    for setting, block in settings(rows):
        for method in dict.fromkeys(r["method"] for r in block):
            sub = [r for r in block if r["method"] == method]
            dice = [r["dice"] for r in sub]
            hd = [r["hd95_mm"] for r in sub]
            entry = {"setting": setting, "base": sub[0]["base"], "method": method, "runs": len(sub),
                     "dice_mean": statistics.mean(dice), "dice_sd": statistics.stdev(dice) if len(dice) > 1 else 0.0,
                     "hd95_mean_mm": statistics.mean(hd), "hd95_sd_mm": statistics.stdev(hd) if len(hd) > 1 else 0.0,
                     "trainable": sub[0]["trainable"], "adapter_kb": round(sub[0]["adapter_bytes"] / 1024, 1),
                     "train_s_median": statistics.median([r["train_s"] for r in sub]),
                     "steps": sub[0]["steps"], "resolution": sub[0]["resolution"]}
            for test in ("robex", "mni152"):
                d = [r["dice"] for r in sub if r["test"] == test]
                entry[f"dice_test_{test}"] = statistics.mean(d) if d else float("nan")
            out.append(entry)
    return out


def write_tables(summary: list, rows: list, out: Path) -> None:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "quality_cases.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    with open(out / "quality_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0].keys()))
        w.writeheader()
        w.writerows(summary)
    lines = []
    for setting in dict.fromkeys(s["setting"] for s in summary):
        sub = [s for s in summary if s["setting"] == setting]
        trained = next((s for s in sub if s["steps"]), sub[0])
        lines += [f"**{sub[0]['base']}** (model input {trained['resolution']}³, {trained['steps']} steps, "
                  f"{max(s['runs'] for s in sub)} runs per trained method = 2 directions × seeds)", "",
                  "| method | Dice mean ± sd | Dice, test robex | Dice, test mni152 | HD95 mm mean ± sd | "
                  "trainable values | adapter file | train time (median) |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in sub:
            size = f"{s['adapter_kb']:,.1f} KB" if s["adapter_kb"] else "–"
            t = f"{s['train_s_median']:.0f} s" if s["steps"] else "–"
            lines.append(f"| {s['method']} | {s['dice_mean']:.3f} ± {s['dice_sd']:.3f} | {s['dice_test_robex']:.3f} | "
                         f"{s['dice_test_mni152']:.3f} | {s['hd95_mean_mm']:.2f} ± {s['hd95_sd_mm']:.2f} | "
                         f"{s['trainable']:,d} | {size} | {t} |")
        lines.append("")
    (out / "quality_summary.md").write_text("\n".join(lines))


def plot(summary: list, rows: list, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    bases = list(dict.fromkeys(s["setting"] for s in summary))  # one row of panels per setting
    blocks = dict(settings(rows))
    fig, axes = plt.subplots(len(bases), 2, figsize=(12, 3.6 * len(bases)), dpi=100, squeeze=False)
    for i, base in enumerate(bases):
        sub = [s for s in summary if s["setting"] == base]
        names = [s["method"] for s in sub]
        for j, (metric, title) in enumerate((("dice", "Dice (higher is better)"), ("hd95_mm", "HD95 mm (lower is better)"))):
            ax = axes[i][j]
            for k, s in enumerate(sub):
                pts = [r for r in blocks[base] if r["method"] == s["method"]]
                for test, colour in (("robex", "tab:blue"), ("mni152", "tab:orange")):
                    v = [r[metric] for r in pts if r["test"] == test]
                    ax.scatter(np.full(len(v), k) + (-0.12 if test == "robex" else 0.12), v, s=14, color=colour,
                               label=f"test {test}" if k == 0 else None, zorder=3)
                mean = np.mean([r[metric] for r in pts])
                ax.hlines(mean, k - 0.3, k + 0.3, color="black", lw=1.5, zorder=4)
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
            ax.set_title(f"{base}: {title}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            if j == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality.png")
    plt.close(fig)

    for key, xlabel, name in (("trainable", "trainable values (log)", "quality_dice_vs_trainable.png"),
                              ("train_s_median", "training time, median s (log; a shared 2-core VM)",
                               "quality_dice_vs_time.png")):
        fig, axes = plt.subplots(1, len(bases), figsize=(6.5 * len(bases), 4.2), dpi=100, squeeze=False)
        for ax, base in zip(axes[0], bases):
            for k, s in enumerate(s for s in summary if s["setting"] == base):
                if s["trainable"]:  # the colours repeat after ten rows: the marker tells them apart
                    ax.errorbar(s[key], s["dice_mean"], yerr=s["dice_sd"], fmt="osD^"[k // 10 % 4], capsize=3,
                                label=s["method"])
                else:
                    ax.axhline(s["dice_mean"], ls="--", lw=0.9, color="grey", label="zero-shot")
            zero = [s["dice_mean"] for s in summary if s["setting"] == base and not s["trainable"]]
            low = [s["method"] for s in summary if s["setting"] == base and zero and s["dice_mean"] < zero[0] - 0.1]
            if low:  # a diverged run would squash the rest: leave it off the scale, named
                ax.set_ylim(bottom=zero[0] - 0.1)
                ax.text(0.99, 0.01, "below the scale: " + ", ".join(low), transform=ax.transAxes, fontsize=6,
                        ha="right")
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("Dice, site convention (mean ± sd over runs)")
            ax.set_title(base, fontsize=10)
            ax.legend(fontsize=6, ncol=2)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", choices=["deepbet", "unetr"], required=True)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--directions", type=int, default=2, choices=[1, 2],
                        help="2: mni152->robex and robex->mni152; 1: mni152->robex only")
    parser.add_argument("--resolution", type=int, default=128, help="deepbet model input (256 = its real setting)")
    parser.add_argument("--unetr-spec", help="network spec JSON of the distilled UNETR (benchmarks/vit_base.py)")
    parser.add_argument("--methods", nargs="*", help="only methods whose label contains one of these strings")
    parser.add_argument("--lr-scale", type=float, default=1.0,
                        help="train at the method's default learning rate times this (rows labelled 'lr×…')")
    parser.add_argument("--budgets", action="store_true",
                        help="only write budgets_<base>.md: trainable values per method and rank (no training)")
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "benchmarks-results"))
    parser.add_argument("--work", default=None, help="adapters and segmentations (default: cache)")
    args = parser.parse_args(argv)
    if args.work is None:
        from tcurlora.fetch import cache_dir

        args.work = str(cache_dir() / "benchmarks" / "work")
    if args.base == "unetr" and not args.unetr_spec:
        import vit_base

        args.unetr_spec = str(vit_base.build(vit_base.default_dir()))
    if args.budgets:
        table = budget_table(args.base, resolution=args.resolution,
                             unetr_spec=Path(args.unetr_spec) if args.unetr_spec else None)
        (Path(args.out) / f"budgets_{args.base}.md").write_text(table)
        print(table)
        return 0
    run(args)
    # tables over every run recorded so far for the same settings and base weights (both bases when both were run)
    rows = latest_weights([json.loads(l) for l in (Path(args.out) / "quality_runs.jsonl").read_text().splitlines()])
    summary = summarise(rows)
    write_tables(summary, rows, Path(args.out))
    plot(summary, rows, Path(args.out))
    print((Path(args.out) / "quality_summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
