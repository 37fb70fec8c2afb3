"""Run the whole benchmark suite (not the unit tests) and write tables and plots.

    nice -n 10 python benchmarks/run_all.py            # the numbers in docs/benchmarks.md
    nice -n 10 python benchmarks/run_all.py --quick    # every code path in a few minutes; numbers meaningless

Steps: (1) build or reuse the distilled UNETR base (benchmarks/vit_base.py); (2) quality on the real
heads for deepbet and for the UNETR (benchmarks/quality.py), and the paper's baselines with learning rates chosen
on a validation split (benchmarks/comparison.py); (3) CPU speed and memory per method, each
in a fresh subprocess (benchmarks/resources.py): the ViT bases (UNETR small and ViT-B, ``resources.*``) and the
conv bases (deepbet 128³ and nnU-Net's PlainConvUNet at its planned patch, ``resources_conv.*``); (4) the time to
a useful adapter on this CPU: the default ``tcurlora finetune`` against 100 full-resolution steps
(benchmarks/cpu_default.py).  Writes CSV, Markdown and PNG under docs/benchmarks-results/ (``--quick``:
docs/benchmarks-results/quick/), plus results.md with the machine, the command, the date and the load average
before and after, and (not with ``--quick``) regenerates the speed table of docs/benchmarks.md (benchmarks/readme_table.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def machine_info() -> dict:
    import monai
    import torch

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "?", False
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return {"date": datetime.datetime.now().astimezone().replace(microsecond=0).isoformat(),
            "host": platform.node(), "nproc": os.cpu_count(), "cpu_model": cpu, "memory_gb": round(mem_gb, 1),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "monai": monai.__version__, "peft": peft_version, "git": commit + (" (with uncommitted changes)" if dirty else ""),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def step(cmd: list, log) -> float:
    log(f"$ {' '.join(str(c) for c in cmd)}")
    t0 = time.time()
    subprocess.run([sys.executable] + [str(c) for c in cmd], check=True, cwd=ROOT)
    return time.time() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 direction, 2 steps, tiny base")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--deepbet-steps", type=int, default=8)
    parser.add_argument("--deepbet-resolution", type=int, default=128)
    parser.add_argument("--unetr-steps", type=int, nargs="+", default=[8, 24],
                        help="one quality run per value (the UNETR is cheap enough for two budgets)")
    parser.add_argument("--distill-steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["quality-deepbet", "quality-unetr", "comparison-deepbet", "comparison-unetr",
                                 "resources", "resources-conv", "cpu-default"])
    args = parser.parse_args(argv)
    import vit_base  # benchmarks/ is on sys.path when run as a script

    out = args.out or (ROOT / "docs" / "benchmarks-results" / ("quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        seeds, directions, db_steps, un_steps = [0], 1, 2, [2]
        distill = args.distill_steps or 4
        res_args = conv_args = ["--steps", "1", "--warmup", "1", "--segment-repeats", "1", "--rounds", "1"]
    else:
        seeds, directions, db_steps, un_steps = args.seeds, 2, args.deepbet_steps, args.unetr_steps
        distill = args.distill_steps or vit_base.DEFAULT_STEPS
        res_args = ["--steps", "5", "--warmup", "2", "--segment-repeats", "2", "--rounds", "3"]
        # the conv bases' ratios spread more from round to round on a shared machine: more, shorter rounds
        conv_args = ["--steps", "3", "--warmup", "2", "--segment-repeats", "2", "--rounds", "7"]
    t_start = time.time()
    lines = []
    log = lambda m: (print(m, flush=True), lines.append(m))  # noqa: E731
    info = machine_info()
    info["uptime_before"] = uptime()
    info["command"] = "python benchmarks/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:])
    log(f"# {info['command']}  ({info['date']})")
    log(f"# {info['nproc']} CPUs ({info['cpu_model']}), torch {info['torch']}; {info['uptime_before']}")
    timings = {}
    quality_out = ["--out", out, "--seeds", *seeds, "--directions", directions]
    base_dir = vit_base.default_dir()  # the cache: weights (28 MB) and work files stay out of the repository
    work = ["--work", base_dir / ("work-quick" if args.quick else "work")]
    timings["vit_base"] = step([HERE / "vit_base.py", "--out", base_dir, "--steps", distill,
                                "--agreement-json", out / "vit_base_agreement.json"], log)
    spec = json.loads((out / "vit_base_agreement.json").read_text())["spec"]
    if "quality-deepbet" not in args.skip:
        timings["quality_deepbet"] = step([HERE / "quality.py", "--base", "deepbet", "--steps", db_steps,
                                           "--resolution", args.deepbet_resolution, *quality_out, *work], log)
    if "quality-unetr" not in args.skip:
        for n in un_steps:
            timings[f"quality_unetr_{n}steps"] = step([HERE / "quality.py", "--base", "unetr", "--steps", n,
                                                       "--unetr-spec", spec, *quality_out, *work], log)
    for name in ("deepbet", "unetr"):  # the paper's baselines, learning rates chosen on a validation split
        if f"comparison-{name}" not in args.skip:
            smoke = (["--steps", "1", "--seeds", "0", "--lr-scales", "1", "--widen", "0", "--methods", "tCURLoRA r=8",
                      "LoRA (PEFT) r=1"] if args.quick else [])
            timings[f"comparison_{name}"] = step([HERE / "comparison.py", "--base", name, "--unetr-spec", spec,
                                                  "--out", out, *smoke], log)
    if "resources" not in args.skip:
        vit = ["unetr-small"] if args.quick else ["unetr-small", "vitb"]
        timings["resources"] = step([HERE / "resources.py", "--out", out, "--models", *vit, "--no-segment256",
                                     *res_args], log)
    if "resources-conv" not in args.skip:
        conv = ["deepbet128"] if args.quick else ["deepbet128", "nnunet"]
        timings["resources_conv"] = step([HERE / "resources.py", "--out", out, "--models", *conv, "--stem",
                                          "resources_conv", *conv_args], log)
    if "cpu-default" not in args.skip and not args.quick:  # minutes of real training: no quick form
        timings["cpu_default"] = step([HERE / "cpu_default.py", "--out", out], log)
    info["uptime_after"] = uptime()
    info["wall_s"] = {k: round(v, 1) for k, v in timings.items()}
    info["total_wall_s"] = round(time.time() - t_start, 1)
    (out / "machine.json").write_text(json.dumps(info, indent=2))
    write_results(out, info, spec)
    if not args.quick:
        import readme_table

        readme_table.update_readme(readme_table.SUMMARY_PAGE, readme_table.speed_table(out))
        log("# docs/benchmarks.md speed table regenerated")
    log(f"# done in {info['total_wall_s'] / 60:.1f} min; {info['uptime_after']}")
    log(f"# results: {out / 'results.md'}")
    return 0


def write_results(out: Path, info: dict, spec: str) -> None:
    parts = [f"# Benchmark results{' (quick smoke run: numbers meaningless)' if 'quick' in out.name else ''}", "",
             f"- command: `{info['command']}`", f"- date: {info['date']}",
             f"- machine: {info['nproc']} CPUs ({info['cpu_model']}), {info['memory_gb']} GB RAM, "
             f"Python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads), "
             f"MONAI {info['monai']}, PEFT {info['peft']}, git {info['git']}",
             f"- load before: `{info['uptime_before']}`", f"- load after: `{info['uptime_after']}`",
             f"- wall time: {info['total_wall_s'] / 60:.1f} min ("
             + ", ".join(f"{k} {v / 60:.1f} min" for k, v in info["wall_s"].items()) + ")"]
    # runs made outside this invocation (quality runs are resumed from quality_runs.jsonl, not repeated)
    parts += [f"- earlier run, reused: {e}" for e in info.get("earlier_runs", [])]
    parts += [f"- additional command: `{c}`" for c in info.get("additional_commands", [])]
    parts += [f"- note: {n}" for n in info.get("notes", [])]
    parts.append("")
    agreement = out / "vit_base_agreement.json"
    if agreement.is_file():
        a = json.loads(agreement.read_text())
        parts += ["## Distilled UNETR base: agreement with its teacher (deepbet zero-shot masks)", "",
                  f"Spec: `unetr_small_distilled.json` (weights `{a['spec_json']['weights']}`, "
                  f"{a.get('weights_bytes', 0) / 2 ** 20:.1f} MB, sha256 {a.get('weights_sha256', '?')[:16]}…, kept in the "
                  f"cache, rebuilt by `benchmarks/vit_base.py`); provenance: "
                  f"`{json.dumps(a['spec_json'].get('provenance', {}))}`", "",
                  "| head | Dice vs deepbet | HD95 mm vs deepbet |", "|---|---|---|"]
        parts += [f"| {r['head']} | {r['dice_vs_deepbet']:.3f} | {r['hd95_mm_vs_deepbet']:.1f} |" for r in a["rows"]]
        parts.append("")
    for title, name in (("Quality (site convention: expert masks grown by 3 mm)", "quality_summary.md"),
                        ("The paper's baselines, deepbet (learning rate chosen on validation)", "comparison.md"),
                        ("The paper's baselines, UNETR (learning rate chosen on validation)", "comparison_unetr.md"),
                        ("Speed and memory, ViT bases (CPU, one fresh process per method)", "resources.md"),
                        ("Speed and memory, conv bases (CPU, one fresh process per method)", "resources_conv.md"),
                        ("Time to a useful adapter on this CPU", "cpu_default.md")):
        if (out / name).is_file():
            parts += [f"## {title}", "", (out / name).read_text(), ""]
    (out / "results.md").write_text("\n".join(parts))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
