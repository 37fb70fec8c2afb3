"""Train-step and merged-inference speed of tCURLoRA against PEFT LoRA, decoder-only and full fine-tuning.

Not a test: it prints medians.  Run it on an idle machine:

    python benchmarks/bench_speed.py                 # small UNETR 64³ and ViT-B UNETR 96³, CPU
    python benchmarks/bench_speed.py --only small --steps 10
    python benchmarks/bench_speed.py --device cuda --bf16

Targets (issue #2): tCURLoRA/LoRA ≤ 1.20, tCURLoRA/full ≤ 0.75, merged inference / base = 1.00 ± 0.03.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
from monai.networks.nets import UNETR

from tcurlora import TCURLoRAConfig, inject_adapter, merge_adapter, trainable_parameter_count
from tcurlora.adapter import get_adapter

DECODER = ["encoder[1-4]", "decoder[2-5]", "out"]
CONFIGS = {
    "small": dict(img=64, hidden=192, mlp=768, heads=4, feature=16),
    "vitb": dict(img=96, hidden=768, mlp=3072, heads=12, feature=16),
}


def build(cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    return UNETR(1, 2, (cfg["img"],) * 3, feature_size=cfg["feature"], hidden_size=cfg["hidden"],
                 mlp_dim=cfg["mlp"], num_heads=cfg["heads"])


def train_step_times(model, x, y, steps, warmup, device, bf16):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def infer_times(model, x, steps, warmup, device):
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(name, cfg, args):
    device = args.device
    base = build(cfg).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, cfg["img"], cfg["img"], cfg["img"], generator=g).to(device)
    y = torch.randint(0, 2, (args.batch, cfg["img"], cfg["img"], cfg["img"]), generator=g).to(device)
    methods = {
        "tcurlora": TCURLoRAConfig(preset="vit", rank=args.rank),
        "lora": TCURLoRAConfig(method="lora", preset="vit", rank=args.rank),
        "decoder": TCURLoRAConfig(method="decoder", train_modules=DECODER),
        "tcurlora+decoder": TCURLoRAConfig(preset="vit", rank=args.rank, train_modules=DECODER),
        "full": TCURLoRAConfig(method="full"),
    }
    rows = {}
    for method, config in methods.items():
        model = copy.deepcopy(base).train()
        inject_adapter(model, config)
        t = train_step_times(model, x, y, args.steps, args.warmup, device, args.bf16)
        rows[method] = {"train_step_s": t, "trainable": trainable_parameter_count(model)}
        print(f"  {name:6s} {method:17s} train step {t:7.3f} s   trainable {rows[method]['trainable']:>11,d}", flush=True)
        del model

    # merged inference: a trained-looking adapter merged into the weights vs the plain base model
    model = copy.deepcopy(base).eval()
    inject_adapter(model, TCURLoRAConfig(preset="vit", rank=args.rank))
    with torch.no_grad():
        for s in get_adapter(model).stacks.values():
            s.delta_u.normal_(0, 1e-3)
    merge_adapter(model)
    base.eval()
    t_base, t_merged = [], []
    for _ in range(3):  # interleave to cancel drift
        t_base.append(infer_times(base, x, args.steps, 1, device))
        t_merged.append(infer_times(model, x, args.steps, 1, device))
    rows["inference"] = {"base_s": statistics.median(t_base), "merged_s": statistics.median(t_merged)}
    r = {
        "tcurlora/lora": rows["tcurlora"]["train_step_s"] / rows["lora"]["train_step_s"],
        "tcurlora/full": rows["tcurlora"]["train_step_s"] / rows["full"]["train_step_s"],
        "tcurlora/decoder": rows["tcurlora"]["train_step_s"] / rows["decoder"]["train_step_s"],
        "tcurlora+decoder/full": rows["tcurlora+decoder"]["train_step_s"] / rows["full"]["train_step_s"],
        "merged/base inference": rows["inference"]["merged_s"] / rows["inference"]["base_s"],
    }
    for k, v in r.items():
        print(f"  {name:6s} {k:24s} {v:5.2f}", flush=True)
    return {"config": cfg, "rows": rows, "ratios": r}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(CONFIGS), action="append")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}, batch {args.batch}, rank {args.rank}")
    results = {name: run(name, CONFIGS[name], args) for name in (args.only or list(CONFIGS))}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
