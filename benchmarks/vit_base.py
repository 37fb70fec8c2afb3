"""A small pretrained ViT base (MONAI UNETR) for the benchmarks, made offline by distillation.

No pretrained UNETR can be had offline, so we make one from what we have: a small MONAI UNETR
(48³ input at 5 mm, ViT hidden 192, MLP 768, 4 heads, 12 blocks of 27 tokens, conv feature size 8) is trained from
a seeded random init to reproduce **deepbet's zero-shot brain masks** (the teacher, run at its real
256³ setting) on every real head in ``tcurlora.datasets``: mni152, robex, brain1, brain2 and
nibabel_anatomical.  Training goes through ``tcurlora.train.finetune`` itself (``method="full"``,
AdamW lr 1e-3 with poly decay, Dice+CE, batch 1 of the 48³ whole-head patch, the package's light
augmentation), so the base sees exactly the preprocessing that adapters later see.

The result is a network spec JSON + ``.safetensors`` weights that ``tcurlora.load_base(spec)`` loads
(the spec names the weights file beside it).  Honest caveat: the base has seen the mni152 and robex
*images* (with deepbet's labels, not the site convention the benchmark adapts to): a stand-in for a
pretrained model, not a foundation model.

    python benchmarks/vit_base.py                    # build (or reuse) and print teacher agreement
    python benchmarks/vit_base.py --steps 10 --out /tmp/vit   # a fast smoke build
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

from resources import UNETR_DECODER  # benchmarks/ is on sys.path when run as a script

HEADS = ["mni152", "robex", "brain1", "brain2", "nibabel_anatomical"]
NETWORK = {"class": "UNETR", "args": {"in_channels": 1, "out_channels": 2, "img_size": [48, 48, 48],
                                      "feature_size": 8, "hidden_size": 192, "mlp_dim": 768, "num_heads": 4}}
PREPROCESSING = {"orientation": "RAS", "spacing": [5.0, 5.0, 5.0],
                 "intensity": {"kind": "percentile", "lower": 0.5, "upper": 99.5, "b_min": 0.0, "b_max": 1.0,
                               "clip": True},
                 "patch_size": [48, 48, 48], "divisible_by": 16}
LABELS = [{"value": 1, "name": "Brain", "color": [0.949, 0.757, 0.659]}]  # deepbet's table: no new head
DEFAULT_STEPS = 120
RECIPE = {"teacher": "deepbet 1.0.2 zero-shot at 256³ (largest component)", "heads": HEADS,
          "method": "full (from a seeded random init)", "optimizer": "AdamW lr 1e-3 wd 2e-5, poly 0.9",
          "loss": "Dice+CE", "batch": 1, "init_seed": 0}


def default_dir() -> Path:
    from tcurlora.fetch import cache_dir

    return cache_dir() / "benchmarks"


def spec_dict(weights_name: str) -> dict:
    return {"name": "unetr-small-distilled", "network": NETWORK, "weights": weights_name, "labels": LABELS,
            "preprocessing": PREPROCESSING, "head": "out.conv.conv", "decoder_modules": UNETR_DECODER,
            "inference_roi": PREPROCESSING["patch_size"]}


def recipe_key(steps: int) -> str:
    blob = json.dumps({"network": NETWORK, "prep": PREPROCESSING, "recipe": RECIPE, "steps": steps}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def teacher_masks(work: Path, log=print) -> list:
    """deepbet zero-shot brain masks (real 256³ setting) on every head: [(image, mask), ...]."""
    from tcurlora.datasets import get_scan
    from tcurlora.events import Events
    from tcurlora.infer import segment
    from tcurlora.models import load_base

    work.mkdir(parents=True, exist_ok=True)
    pairs, teacher = [], None
    for name in HEADS:
        image, _ = get_scan(name)
        mask = work / f"{name}_deepbet.nii.gz"
        if not mask.is_file():
            teacher = teacher or load_base("deepbet")
            t0 = time.time()
            segment(teacher, [str(image)], str(mask), device="cpu", events=Events())
            log(f"  teacher mask {name}: {time.time() - t0:.1f} s")
        pairs.append((str(image), str(mask)))
    return pairs


def build(out: Path, steps: int = DEFAULT_STEPS, force: bool = False, log=print) -> Path:
    """Build (or reuse) the distilled UNETR; return the spec JSON path."""
    import torch
    from monai.networks.nets import UNETR
    from safetensors.torch import load_file, save_file

    from tcurlora.events import Events
    from tcurlora.models import load_base
    from tcurlora.train import FinetuneOptions, finetune

    key = recipe_key(steps)
    folder = Path(out) / f"unetr_small_distilled-{steps}steps-{key}"
    spec_path = folder / "unetr_small_distilled.json"
    if spec_path.is_file() and not force:
        log(f"distilled UNETR: reusing {spec_path}")
        return spec_path
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pairs = teacher_masks(Path(out) / "teacher", log)

    torch.manual_seed(RECIPE["init_seed"])
    init = UNETR(**NETWORK["args"])
    save_file({k: v.contiguous() for k, v in init.state_dict().items()}, str(folder / "init.safetensors"))
    (folder / "init.json").write_text(json.dumps(spec_dict("init.safetensors"), indent=2))
    base = load_base(str(folder / "init.json"))
    options = FinetuneOptions(method="full", steps=steps, lr=1e-3, batch_size=RECIPE["batch"], device="cpu",
                              seed=0, bf16=False)
    log(f"distilling a UNETR ({sum(p.numel() for p in base.network.parameters()):,} parameters) from deepbet "
        f"on {len(pairs)} heads, {steps} steps")
    torch.manual_seed(0)
    with open(folder / "distill_events.jsonl", "w") as stream:  # progress, one JSON line per step
        result = finetune(base, pairs, folder / "distill.safetensors", options=options, events=Events(stream))
    state = load_file(str(folder / "distill.safetensors"))
    meta = {"recipe": json.dumps({**RECIPE, "steps": steps, "final_loss": result.metrics.final_loss}),
            "network": json.dumps(NETWORK)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "unetr_small_distilled.safetensors"),
              metadata=meta)
    spec = spec_dict("unetr_small_distilled.safetensors")
    spec["provenance"] = {**RECIPE, "steps": steps, "seconds": round(time.time() - t0, 1),
                          "final_loss": result.metrics.final_loss}
    spec_path.write_text(json.dumps(spec, indent=2))
    for tmp in ("distill.safetensors", "distill.checkpoint.pt", "init.safetensors", "init.json"):
        (folder / tmp).unlink(missing_ok=True)
    load_base(str(spec_path))  # loads as any user's spec + weights would
    log(f"distilled UNETR written: {spec_path} ({time.time() - t0:.0f} s, final loss "
        f"{result.metrics.final_loss:.3f})")
    return spec_path


def teacher_agreement(spec_path: Path, work: Path) -> list:
    """Dice/HD95 of the distilled UNETR against deepbet's masks on each head (fidelity, not accuracy)."""
    from tcurlora.events import Events
    from tcurlora.infer import segment
    from tcurlora.metrics import evaluate
    from tcurlora.models import load_base

    base = load_base(str(spec_path))
    pristine = copy.deepcopy(base.network)
    rows = []
    for image, mask in teacher_masks(work):
        name = Path(mask).name.replace("_deepbet.nii.gz", "")
        out = Path(work) / f"{name}_unetr.nii.gz"
        base.network = copy.deepcopy(pristine)
        segment(base, [image], str(out), device="cpu", events=Events())
        m = evaluate([str(out)], [mask])[0]
        rows.append({"head": name, "dice_vs_deepbet": m["dice"], "hd95_mm_vs_deepbet": m["hd95_mm"]})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="where the base is built (default: cache)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching base exists")
    parser.add_argument("--agreement-json", type=Path, help="write teacher-agreement rows here")
    args = parser.parse_args(argv)
    out = args.out or default_dir()
    spec = build(out, args.steps, args.force)
    rows = teacher_agreement(spec, out / "teacher")
    for r in rows:
        print(f"  {r['head']:20s} Dice vs deepbet {r['dice_vs_deepbet']:.3f}  HD95 {r['hd95_mm_vs_deepbet']:.1f} mm")
    if args.agreement_json:
        args.agreement_json.parent.mkdir(parents=True, exist_ok=True)
        spec_json = json.loads(spec.read_text())
        weights = spec.parent / spec_json["weights"]
        sha = hashlib.sha256(weights.read_bytes()).hexdigest()
        args.agreement_json.write_text(json.dumps({"spec": str(spec), "weights_sha256": sha,
                                                   "weights_bytes": weights.stat().st_size, "rows": rows,
                                                   "spec_json": spec_json}, indent=2))
        # the spec (small) and the distillation curve go beside the results; the 28 MB weights stay in the cache
        (args.agreement_json.parent / "unetr_small_distilled.json").write_text(json.dumps(spec_json, indent=2))
        curve = spec.parent / "distill.curve.png"
        if curve.is_file():
            (args.agreement_json.parent / "unetr_small_distill_curve.png").write_bytes(curve.read_bytes())
    print(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
