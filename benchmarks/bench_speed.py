"""Train-step and merged-inference speed of tCURLoRA against PEFT LoRA, decoder-only and full fine-tuning.

Not a test: it prints medians.  Run it on an idle machine:

    python benchmarks/bench_speed.py                 # small UNETR 64³ and ViT-B UNETR 96³, CPU
    python benchmarks/bench_speed.py --only small --steps 10
    python benchmarks/bench_speed.py --device cuda --bf16

Each (model, method) runs in a fresh Python process, and the methods take turns over ``--rounds``
rounds: a method that runs after another in the same process inherits its memory mappings (on this
CPU machine page faults of the large activations are a visible part of a step), and load drifts.
The reported time is the median of all timed steps of all rounds.

Targets (issue #2): tCURLoRA/LoRA ≤ 1.20, tCURLoRA/full ≤ 0.75, merged inference / base = 1.00 ± 0.03.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from resources import UNETR_DECODER, _sync  # benchmarks/ is on sys.path when run as a script
CONFIGS = {
    "small": dict(img=64, hidden=192, mlp=768, heads=4, feature=16),
    "vitb": dict(img=96, hidden=768, mlp=3072, heads=12, feature=16),
}
METHODS = ["tcurlora", "lora", "decoder", "tcurlora+decoder", "full"]


def build(cfg) -> torch.nn.Module:
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    return UNETR(1, 2, (cfg["img"],) * 3, feature_size=cfg["feature"], hidden_size=cfg["hidden"],
                 mlp_dim=cfg["mlp"], num_heads=cfg["heads"])


def method_config(method: str, rank: int):
    from tcurlora import TCURLoRAConfig

    return {
        "tcurlora": TCURLoRAConfig(preset="vit", rank=rank),
        "lora": TCURLoRAConfig(method="lora", preset="vit", rank=rank),
        "decoder": TCURLoRAConfig(method="decoder", train_modules=UNETR_DECODER),
        "tcurlora+decoder": TCURLoRAConfig(preset="vit", rank=rank, train_modules=UNETR_DECODER),
        "full": TCURLoRAConfig(method="full"),
    }[method]


def train_step_times(model, x, y, steps, warmup, device, bf16):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def infer_time(model, x, device):
    _sync(device)
    t0 = time.perf_counter()
    model(x)
    _sync(device)
    return time.perf_counter() - t0


def child(args) -> dict:
    """One (model, method) in this process: its timed steps (or inference times) as a dict."""
    from tcurlora import TCURLoRAConfig, inject_adapter, merge_adapter, trainable_parameter_count
    from tcurlora.adapter import get_adapter

    cfg, device = CONFIGS[args.child[0]], args.device
    model = build(cfg).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, *(cfg["img"],) * 3, generator=g).to(device)
    y = torch.randint(0, 2, (args.batch, *(cfg["img"],) * 3), generator=g).to(device)
    method = args.child[1]
    if method == "inference":
        # a trained-looking adapter merged into the weights vs the plain base model, interleaved
        merged = build(cfg).to(device).eval()
        inject_adapter(merged, TCURLoRAConfig(preset="vit", rank=args.rank))
        with torch.no_grad():
            for s in get_adapter(merged).stacks.values():
                s.delta_u.normal_(0, 1e-3)
        merge_adapter(merged)
        model.eval()
        base_s, merged_s = [], []
        for i in range(args.warmup + 3 * args.steps):
            b, m = infer_time(model, x, device), infer_time(merged, x, device)
            if i >= args.warmup:
                base_s.append(b)
                merged_s.append(m)
        return {"base_s": base_s, "merged_s": merged_s}
    model.train()
    inject_adapter(model, method_config(method, args.rank))
    times = train_step_times(model, x, y, args.steps, args.warmup, device, args.bf16)
    import resource  # peak RSS of this process (Linux reports KiB); GPU runs: the host side only

    return {"times": times, "trainable": trainable_parameter_count(model),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(name: str, method: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, method, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--rank", str(args.rank),
           "--device", args.device] + (["--bf16"] if args.bf16 else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(name: str, args) -> dict:
    methods = args.methods or METHODS
    samples = {m: [] for m in methods}
    trainable, peak, base_s, merged_s = {}, {}, [], []
    for round_ in range(args.rounds):
        for method in methods:
            r = run_child(name, method, args)
            samples[method] += r["times"]
            trainable[method] = r["trainable"]
            peak[method] = max(peak.get(method, 0.0), r["peak_rss_mb"])
            print(f"  {name:6s} round {round_ + 1} {method:17s} steps " + " ".join(f"{t:.3f}" for t in r["times"]),
                  flush=True)
        if not args.no_inference:
            r = run_child(name, "inference", args)
            base_s += r["base_s"]
            merged_s += r["merged_s"]
    rows = {m: {"train_step_s": statistics.median(samples[m]), "steps_s": samples[m], "trainable": trainable[m],
                "peak_rss_mb": peak[m]} for m in methods}
    for m in methods:
        print(f"  {name:6s} {m:17s} train step {rows[m]['train_step_s']:7.3f} s   "
              f"trainable {rows[m]['trainable']:>11,d}   peak RSS {rows[m]['peak_rss_mb']:6.0f} MB", flush=True)
    t = {m: rows[m]["train_step_s"] for m in methods}
    ratios = {f"{a}/{b}": t[a] / t[b] for a, b in [("tcurlora", "lora"), ("tcurlora", "full"), ("tcurlora", "decoder"),
                                                   ("tcurlora+decoder", "full")] if a in t and b in t}
    if base_s:
        rows["inference"] = {"base_s": statistics.median(base_s), "merged_s": statistics.median(merged_s),
                             "base_all_s": base_s, "merged_all_s": merged_s}
        ratios["merged/base inference"] = rows["inference"]["merged_s"] / rows["inference"]["base_s"]
    for k, v in ratios.items():
        print(f"  {name:6s} {k:24s} {v:5.2f}", flush=True)
    return {"config": CONFIGS[name], "rows": rows, "ratios": ratios}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(CONFIGS), action="append")
    parser.add_argument("--steps", type=int, default=5, help="timed train steps per method and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="fresh-process runs of every method, taking turns")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="a subset of the methods (default: all)")
    parser.add_argument("--no-inference", action="store_true", help="skip the merged-inference comparison")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}, batch {args.batch}, rank {args.rank}, "
          f"{args.rounds} rounds × {args.steps} steps after {args.warmup} warm-up, load {os.getloadavg()[0]:.2f}",
          flush=True)
    results = {name: run(name, args) for name in (args.only or list(CONFIGS))}
    results["machine"] = {"node": platform.node(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "load_after": os.getloadavg()[0], "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
