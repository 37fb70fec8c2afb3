"""Time to a useful adapter on a CPU: the default ``tcurlora finetune`` against 100 full-resolution steps.

The demo's task (deepbet, a site's brain-mask convention): train on the MNI152 head, segment the held-out ROBEX
head, Dice against its site mask.  Every variant is the real command line in a fresh process (model loading,
preprocessing, training, writing the adapter: the wall time a user waits), then ``tcurlora segment`` with the
adapter.  Variants run one after another, so run this on an otherwise idle machine.

    python benchmarks/cpu_default.py                                   # default vs reference
    python benchmarks/cpu_default.py --variant "p128 s150=--patch-size 128 128 128 --steps 150"

Writes ``cpu_default.json`` and ``cpu_default.md`` under ``--out`` (default docs/benchmarks-results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REFERENCE_STEPS = 100
FULL_RESOLUTION = ("256", "256", "256")  # deepbet's own input: the brain's bounding box resized to 256³
VARIANTS = {
    "default (tcurlora finetune, no options)": [],
    f"reference: {REFERENCE_STEPS} full-resolution steps": ["--steps", str(REFERENCE_STEPS),
                                                           "--patch-size", *FULL_RESOLUTION],
}


def run(argv, log: Path) -> float:
    """Run ``python -m tcurlora ARGV`` (output to ``log``); its wall time in seconds."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.run([sys.executable, "-m", "tcurlora", *map(str, argv)], stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv[:1]))} failed (exit {proc.returncode}): see {log}")
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="an extra variant: a name and the finetune flags it adds")
    parser.add_argument("--only-extra", action="store_true", help="run only the --variant ones")
    parser.add_argument("--reuse", type=Path, metavar="JSON", help="take the rows of variants with the same name "
                        "from an earlier cpu_default.json instead of running them again (marked in the table)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-results"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tcurlora.manifest import read_manifest
    from tcurlora.datasets import get_scan
    from tcurlora.demo import TEST_SCAN, TRAIN_SCAN, site_convention
    from tcurlora.metrics import evaluate

    variants = {} if args.only_extra else dict(VARIANTS)
    for item in args.variant:
        name, _, flags = item.partition("=")
        variants[name.strip()] = shlex.split(flags)
    work = Path(tempfile.mkdtemp(prefix="tcurlora-cpu-default-"))
    train_img, train_mask = get_scan(TRAIN_SCAN)
    test_img, test_mask = get_scan(TEST_SCAN)
    train_label = site_convention(str(train_img), str(train_mask), work / "train_site.nii.gz")
    test_label = site_convention(str(test_img), str(test_mask), work / "test_site.nii.gz")
    earlier = {}
    if args.reuse:
        data = json.loads(args.reuse.read_text(encoding="utf-8"))
        earlier = {r["variant"]: dict(r, reused=data["machine"]["date"]) for r in data["rows"]}
    rows = []
    for i, (name, flags) in enumerate(variants.items()):
        if name in earlier and earlier[name]["flags"] == flags:
            rows.append(earlier[name])
            continue
        adapter, seg = work / f"v{i}.safetensors", work / f"v{i}.seg.nrrd"
        train_s = run(["finetune", "--image", train_img, "--label", train_label, "--out", adapter, "--device", "cpu",
                       *flags], work / f"v{i}.finetune.log")
        segment_s = run(["segment", test_img, "-o", seg, "--adapter", adapter, "--device", "cpu"],
                        work / f"v{i}.segment.log")
        metric = evaluate([str(seg)], [str(test_label)])[0]
        manifest = read_manifest(adapter)
        training = manifest.get("provenance") or {}
        rows.append({"variant": name, "flags": flags, "train_wall_s": round(train_s, 1),
                     "segment_wall_s": round(segment_s, 1), "dice": metric["dice"], "hd95_mm": metric["hd95_mm"],
                     "steps": training.get("steps"), "patch_size": training.get("patch_size"),
                     "learning_rate": training.get("learning_rate"), "trainable": manifest.get("trainable_values")})
        print(f"{name}: {train_s:.0f} s, Dice {metric['dice']:.4f}", flush=True)
    import torch

    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "torch_threads": torch.get_num_threads(),
               "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
               "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_default.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2), encoding="utf-8")
    lines = [f"Train on {TRAIN_SCAN}, test on {TEST_SCAN} (site convention); {machine['cpus']} CPUs, "
             f"{machine['date']}, load average after {machine['load_average']}.", "",
             "| variant | steps | patch | lr | finetune wall time | Dice | HD95 mm |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        patch = "×".join(map(str, r["patch_size"])) if r["patch_size"] else "?"
        name = r["variant"] + (f" (run {r['reused']})" if r.get("reused") else "")
        lines.append(f"| {name} | {r['steps']} | {patch} | {r['learning_rate']} | "
                     f"{r['train_wall_s'] / 60:.1f} min | {r['dice']:.4f} | {r['hd95_mm']:.2f} |")
    (out / "cpu_default.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
