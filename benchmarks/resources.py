"""Speed and memory per method, each measured in a fresh subprocess (so peak RSS is that method's own).

Train step = forward + Dice/CE loss + backward + AdamW step on a fixed synthetic batch (no data
loading), median over ``--steps`` after ``--warmup``; every method runs once per round, the rounds interleaved,
and a ratio between two methods is the median of their per-round ratios (load drifts between rounds).
Peak RSS = ``ru_maxrss`` of the child process (the ``struct rusage`` that ``resource.getrusage`` reads, taken
per child with ``os.wait4``), which includes the interpreter, torch and the base weights; the ``inference only``
row (load + one no-grad forward) gives that floor.  Conv bases also get ``backward to the first conv (floor)``:
no weight gradient anywhere, only the input gradients down to the first conv's output (one trainable scale
there) -- the least a step costs for any method that adapts the first conv.  Merged inference: the plain base
against the same base with a tCURLoRA r=8 adapter (non-zero cores) merged into its weights, interleaved
(15 rounds, the order rotating; the ratio is the median of the per-round ratios).
Segment 256³: ``tcurlora.infer.segment`` of the real ROBEX head with deepbet at its real 256³ setting
(localiser, 256³ forward, resampling back), base alone and with a merged tCURLoRA adapter.

    python benchmarks/resources.py                       # CPU: deepbet 128³, nnU-Net PlainConvUNet, UNETR 48³; segment 256³
    python benchmarks/resources.py --device cuda --bf16 --checkpointing
        # GPU: deepbet 128³, UNETR ViT-B 96³ (batch 2), nnU-Net PlainConvUNet; peak GPU memory
        # (torch.cuda.max_memory_allocated), target ≤ 8 GB

Models: ``deepbet128`` (LinkNet3d, the real pretrained weights, 128³ input, batch 1), ``unetr-small``
(the benchmark's UNETR architecture: 48³, hidden 192, feature 8, batch 1; random init, speed does not depend on
the weights), ``vitb`` (UNETR ViT-B 12×768, MLP 3072, 12 heads, 96³, feature 16: the paper's encoder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
UNETR_DECODER = ["encoder[1-4]", "decoder[2-5]", "out"]  # UNETR's conv decoder: everything but the ViT
# nnU-Net's own planner (nnUNetv2_plan_and_preprocess, 3d_fullres) on the test dataset of Testing/nnunet_fixture.py
# chose this PlainConvUNet, patch 80×48×80 and batch 2: the nnU-Net row runs it at that setting (random init)
NNUNET_PLAN = {"n_stages": 5, "features_per_stage": [32, 64, 128, 256, 320], "kernel_sizes": [[3, 3, 3]] * 5,
               "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 1, 2]], "n_conv_per_stage": [2] * 5,
               "n_conv_per_stage_decoder": [2] * 4, "conv_bias": True}
# modules before the decoder: the "decoder-side" tCURLoRA leaves them out, so backward never enters them
ENCODERS = {"deepbet": [r"init(\..*)?", r"down[0-3](\..*)?"], "nnunet": [r"encoder(\..*)?"]}
MODELS = {
    "deepbet128": {"kind": "deepbet", "size": 128, "batch": 1},
    "nnunet": {"kind": "nnunet", "size": (80, 48, 80), "batch": 2},
    "unetr-small": {"kind": "unetr", "size": 48, "batch": 1, "hidden": 192, "mlp": 768, "heads": 4, "feature": 8},
    "vitb": {"kind": "unetr", "size": 96, "batch": 2, "hidden": 768, "mlp": 3072, "heads": 12, "feature": 16},
}
# the options finetune's new-structure ablation measures (docs/new_structure.md), each conv base at the core budget
# that keeps the adapter within 1/10 of LoRA r = 8's values on the new-structure benchmark's version of that base
NEW_STRUCTURE = {"basis": "orthonormal", "rank_stable": True, "norm_scale_shift": True}
NEW_STRUCTURE_BUDGET = {"deepbet": 19_500, "nnunet": 14_300}
GPU_TARGET_GB = 8.0
# what any method that adapts the first conv must pay: the forward plus input gradients down to that conv's
# output, no weight gradient at all (one trainable scale on the first conv's output, nothing else)
BACKWARD_FLOOR = "backward to the first conv (floor)"
INFER_ROUNDS = 15  # merged-inference rounds (at least): a ratio to ±0.03 needs more than a train step's 5


def write_csv(path: Path, rows: list, keys: list) -> None:
    """``rows`` (dicts) as CSV with columns ``keys``; other fields are left out."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def shape_of(model: str) -> tuple:
    size = MODELS[model]["size"]
    return tuple(size) if isinstance(size, (list, tuple)) else (size,) * 3


def preset_of(model: str) -> str:
    return "vit" if MODELS[model]["kind"] == "unetr" else "conv"


def methods_for(model: str) -> list:
    """(label, config kwargs) per method; decoder-only first (the reference)."""
    kind = MODELS[model]["kind"]
    preset = preset_of(model)
    rows = [("decoder-only", {"method": "decoder"}),
            ("tCURLoRA r=8", {"method": "tcurlora", "preset": preset, "rank": 8})]
    if kind == "unetr":
        rows.append(("tCURLoRA r=8 + decoder", {"method": "tcurlora", "preset": preset, "rank": 8, "decoder": True}))
    else:
        rows.append(("tCURLoRA r=8 decoder-side", {"method": "tcurlora", "preset": preset, "rank": 8,
                                                   "exclude_modules": ENCODERS[kind]}))
        rows.append(("tCURLoRA r=8, new-structure options", {"method": "tcurlora", "preset": preset, "rank": 8,
                                                             **NEW_STRUCTURE, "rank_budget": NEW_STRUCTURE_BUDGET[kind]}))
    rows += [("LoRA r=8 (PEFT)", {"method": "lora", "preset": preset, "rank": 8}),
             ("full fine-tuning", {"method": "full"})]
    if kind != "unetr":
        rows.append((BACKWARD_FLOOR, {"method": "backward-floor"}))
    return rows


# ----------------------------------------------------------------------------------------------
# child side


def _build(model: str):
    import torch

    cfg = MODELS[model]
    if cfg["kind"] == "deepbet":
        from tcurlora.models import load_base

        base = load_base("deepbet")
        return base.network, list(base.decoder_modules)
    if cfg["kind"] == "nnunet":
        from dynamic_network_architectures.architectures.unet import PlainConvUNet

        torch.manual_seed(0)
        net = PlainConvUNet(1, conv_op=torch.nn.Conv3d, norm_op=torch.nn.InstanceNorm3d,
                            norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                            nonlin_kwargs={"inplace": True}, num_classes=2, deep_supervision=False, **NNUNET_PLAN)
        return net, [r"decoder\.(stages|transpconvs|seg_layers)(\..*)?"]
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    net = UNETR(1, 2, (cfg["size"],) * 3, feature_size=cfg["feature"], hidden_size=cfg["hidden"],
                mlp_dim=cfg["mlp"], num_heads=cfg["heads"])
    return net, UNETR_DECODER


def _config(kwargs: dict, decoder: list):
    from tcurlora import TCURLoRAConfig

    kw = dict(kwargs)
    train = decoder if (kw.pop("decoder", False) or kw["method"] == "decoder") else []
    return TCURLoRAConfig(**kw, train_modules=train)


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def child_train(job: dict) -> dict:
    import torch
    from monai.losses import DiceCELoss

    from tcurlora import inject_adapter, trainable_parameter_count

    device = job["device"]
    cfg = MODELS[job["model"]]
    net, decoder = _build(job["model"])
    batch = job.get("batch") or cfg["batch"]
    g = torch.Generator().manual_seed(0)
    shape = (batch, 1) + shape_of(job["model"])
    x = torch.randn(shape, generator=g).to(device)
    y = (torch.rand(shape, generator=g) > 0.7).long().to(device)
    if job["method"] is None:  # inference-only floor
        net.to(device).eval()
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=job["bf16"]):
            net(x)
        return {"trainable": 0}
    if job["method"]["method"] == "backward-floor":
        net.requires_grad_(False)
        scale = torch.nn.Parameter(torch.ones(()))
        first = next(m for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
        first.register_forward_hook(lambda module, args, output: output * scale.to(output.device))
        net.register_parameter("floor_scale", scale)
    else:
        from tcurlora.tuners import get_tuner

        get_tuner(net).base_info.setdefault("decoder_modules", decoder)  # a network built here declares it now
        inject_adapter(net, _config(job["method"], decoder))
    net.to(device).train()
    if job["checkpointing"]:
        from tcurlora.train import enable_activation_checkpointing

        enable_activation_checkpointing(net)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(job["warmup"] + job["steps"]):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=job["bf16"]):
            logits = net(x)
            loss = loss_fn(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= job["warmup"]:
            times.append(time.perf_counter() - t0)
    out = {"train_step_s": statistics.median(times), "train_step_all_s": times,
           "trainable": trainable_parameter_count(net)}
    if device == "cuda":
        out["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def child_infer(job: dict) -> dict:
    """Plain base vs tCURLoRA merged vs tCURLoRA active but not merged; interleaved rounds."""
    import copy

    import torch

    from tcurlora import TCURLoRAConfig, inject_adapter, merge_adapter
    from tcurlora.adapter import get_adapter

    device = job["device"]
    base, _ = _build(job["model"])
    preset = preset_of(job["model"])
    adapted = copy.deepcopy(base)
    inject_adapter(adapted, TCURLoRAConfig(preset=preset, rank=8))
    with torch.no_grad():
        for s in get_adapter(adapted).stacks.values():
            s.delta_u.normal_(0, 1e-3)
    unmerged = copy.deepcopy(adapted)
    merge_adapter(adapted)
    nets = {"base": base.to(device).eval(), "merged": adapted.to(device).eval(), "unmerged": unmerged.to(device).eval()}
    x = torch.randn((1, 1) + shape_of(job["model"]), generator=torch.Generator().manual_seed(0)).to(device)
    names = list(nets)
    times = {k: [] for k in nets}
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=job["bf16"]):
        for name, net in nets.items():  # warm-up
            net(x)
        # merged and base run the same operations, so their ratio is timing noise unless something is wrong:
        # enough paired rounds, the order rotating (whoever runs first in a round is not always the same net)
        for round_ in range(max(job["steps"], INFER_ROUNDS)):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                _sync(device)
                t0 = time.perf_counter()
                nets[name](x)
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = {k: statistics.median(t / b for t, b in zip(times[k], times["base"])) for k in ("merged", "unmerged")}
    return {"base_s": med["base"], "merged_s": med["merged"], "unmerged_s": med["unmerged"],
            "merged_over_base": paired["merged"], "unmerged_over_base": paired["unmerged"],
            "all": times}


def child_segment(job: dict) -> dict:
    """deepbet at its real 256³ setting on the ROBEX head, through tcurlora.infer.segment."""
    import copy

    import torch

    from tcurlora import TCURLoRAConfig, inject_adapter, save_adapter
    from tcurlora.adapter import get_adapter
    from tcurlora.datasets import get_scan
    from tcurlora.events import Events
    from tcurlora.infer import segment
    from tcurlora.models import load_base

    image, _ = get_scan("robex")
    base = load_base("deepbet")
    pristine = copy.deepcopy(base.network)
    tmp = Path(tempfile.mkdtemp(prefix="tcurlora-bench-"))
    out = {}
    if job["adapter"]:
        net = copy.deepcopy(pristine)
        inject_adapter(net, TCURLoRAConfig(preset="conv", rank=8))
        with torch.no_grad():
            for s in get_adapter(net).stacks.values():
                s.delta_u.normal_(0, 1e-4)
        save_adapter(net, tmp / "a.safetensors", labels=base.labels)
    for rep in range(job["repeats"]):
        base.network = copy.deepcopy(pristine)
        t0 = time.perf_counter()
        segment(base, [str(image)], str(tmp / "seg.nii.gz"), device=job["device"], events=Events(),
                adapter=str(tmp / "a.safetensors") if job["adapter"] else None)
        out.setdefault("segment_s_all", []).append(time.perf_counter() - t0)
    out["segment_s"] = min(out["segment_s_all"])
    return out


def child_main(job_file: str) -> int:
    import torch

    job = json.loads(Path(job_file).read_text())
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    try:
        result = {"train": child_train, "infer": child_infer, "segment": child_segment}[job["task"]](job)
    except Exception as exc:  # reported as a failed row, not a crash of the whole benchmark
        import traceback

        traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        Path(job["result"]).write_text(json.dumps({"error": f"{type(exc).__name__}: {first}"[:200]}))
        return 1
    result["threads"] = torch.get_num_threads()
    Path(job["result"]).write_text(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------------------------
# parent side


def spawn(job: dict) -> dict:
    """Run one job in a fresh interpreter; return its result plus the child's own peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        job = {**job, "result": os.path.join(tmp, "result.json")}
        job_file = os.path.join(tmp, "job.json")
        Path(job_file).write_text(json.dumps(job))
        t0 = time.time()
        with open(os.path.join(tmp, "stderr.txt"), "w") as err:
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", job_file], stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if os.path.isfile(job["result"]):
            result = json.loads(Path(job["result"]).read_text())
        else:
            tail = Path(tmp, "stderr.txt").read_text().strip().splitlines()[-1:] or ["no output"]
            result = {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    result["wall_s"] = round(time.time() - t0, 1)
    return result


def machine_line() -> str:
    import platform

    import torch

    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return (f"{platform.node()}: {os.cpu_count()} CPUs ({model}), torch {torch.__version__}, "
            f"load average {os.getloadavg()[0]:.1f}")


def run(args) -> dict:
    results = {"train": [], "infer": [], "segment": [], "machine": machine_line(), "date": time.strftime("%Y-%m-%d"),
               "device": args.device,
               "bf16": args.bf16, "checkpointing": args.checkpointing}
    common = {"device": args.device, "bf16": args.bf16, "checkpointing": args.checkpointing,
              "steps": args.steps, "warmup": args.warmup, "threads": args.threads}
    for model in args.models:
        batch = args.batch or MODELS[model]["batch"]
        floor = spawn({**common, "task": "train", "model": model, "method": None, "batch": batch})
        row = {"model": model, "method": "inference only (floor)", "batch": batch, "trainable": 0,
               "train_step_s": None, "peak_rss_mb": floor["peak_rss_mb"], "gpu_peak_gb": None}
        results["train"].append(row)
        print(f"  {model:12s} {row['method']:24s} peak RSS {row['peak_rss_mb']:7.0f} MB", flush=True)
        # every method in a fresh process, the methods taking turns over the rounds (load drifts)
        chosen = [(label, kwargs) for label, kwargs in methods_for(model) if not args.methods or label in args.methods]
        runs = {label: [] for label, _ in chosen}
        for round_ in range(args.rounds):
            for label, kwargs in chosen:
                r = spawn({**common, "task": "train", "model": model, "method": kwargs, "batch": batch})
                runs[label].append(r)
                if "error" in r:
                    print(f"  {model:12s} {label:24s} FAILED: {r['error']}", flush=True)
                else:
                    print(f"  {model:12s} {label:24s} round {round_ + 1}: steps "
                          + " ".join(f"{t:.3f}" for t in r["train_step_all_s"]), flush=True)
        for label, rs in runs.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                results["train"].append({"model": model, "method": label, "batch": batch, "trainable": 0,
                                         "train_step_s": None, "peak_rss_mb": None, "gpu_peak_gb": None,
                                         "error": rs[0]["error"]})
                continue
            steps = [t for r in ok for t in r["train_step_all_s"]]
            # per round (None where it failed): a ratio pairs two methods' medians round by round
            per_round = [None if "error" in r else statistics.median(r["train_step_all_s"]) for r in rs]
            gpu_peaks = [r["gpu_peak_gb"] for r in ok if r.get("gpu_peak_gb") is not None]
            row = {"model": model, "method": label, "batch": batch, "trainable": ok[0]["trainable"],
                   "train_step_s": statistics.median(steps), "train_step_all_s": steps,
                   "train_step_round_s": per_round, "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
                   "gpu_peak_gb": max(gpu_peaks) if gpu_peaks else None}
            results["train"].append(row)
            gpu = f"  GPU peak {row['gpu_peak_gb']:.2f} GB" if row["gpu_peak_gb"] is not None else ""
            print(f"  {model:12s} {label:24s} step {row['train_step_s']:7.3f} s  peak RSS {row['peak_rss_mb']:7.0f} MB"
                  f"  trainable {row['trainable']:>11,d}{gpu}", flush=True)
        if not args.no_infer:
            r = spawn({**common, "task": "infer", "model": model})
            if "error" in r:
                print(f"  {model:12s} inference FAILED: {r['error']}", flush=True)
                continue
            results["infer"].append({"model": model, **r})
            print(f"  {model:12s} inference: base {r['base_s']:.3f} s, merged {r['merged_s']:.3f} s "
                  f"({r['merged_over_base']:.2f}×), unmerged {r['unmerged_s']:.3f} s ({r['unmerged_over_base']:.2f}×)",
                  flush=True)
    if args.segment256:
        for adapter in (False, True):
            r = spawn({**common, "task": "segment", "adapter": adapter, "repeats": args.segment_repeats})
            if "error" in r:
                print(f"  segment 256³ FAILED: {r['error']}", flush=True)
                continue
            results["segment"].append({"what": "deepbet 256³ on ROBEX head" + (" + merged tCURLoRA r=8" if adapter else ""),
                                       **r})
            print(f"  segment 256³ ROBEX {'with adapter' if adapter else 'base'}: {r['segment_s']:.1f} s "
                  f"(runs {', '.join(f'{t:.1f}' for t in r['segment_s_all'])}), peak RSS {r['peak_rss_mb']:.0f} MB",
                  flush=True)
    return results


def step_ratio(row: dict, ref: dict):
    """``row``'s train step over ``ref``'s: the median of the per-round ratios (both ran in the same round, so the
    machine's drift from round to round cancels); the ratio of the overall medians for results without rounds."""
    a, b = row.get("train_step_round_s"), ref.get("train_step_round_s")
    if a and b:
        pairs = [x / y for x, y in zip(a, b) if x is not None and y is not None]
        if pairs:
            return statistics.median(pairs)
    if row.get("train_step_s") is None or ref.get("train_step_s") is None:
        return None
    return row["train_step_s"] / ref["train_step_s"]


def write_tables(results: dict, out: Path, stem: str = "resources") -> str:
    out.mkdir(parents=True, exist_ok=True)
    rows = results["train"]
    lines = [f"Machine: {results['machine']}; device {results['device']}"
             f"{', bf16' if results['bf16'] else ''}{', activation checkpointing' if results['checkpointing'] else ''}.",
             "", "| model | method | batch | trainable | train step (median) | × decoder-only | peak RSS | "
             "× decoder-only |" + (" peak GPU mem | ≤ 8 GB |" if results["device"] == "cuda" else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if results["device"] == "cuda" else "")]
    flat = []
    for r in rows:
        if r.get("error"):
            flat.append({k: v for k, v in r.items() if k not in ("train_step_all_s", "train_step_round_s")})
            lines.append(f"| {r['model']} | {r['method']} | {r['batch']} | – | failed: {r['error']} | – | – | – |"
                         + (" – | – |" if results["device"] == "cuda" else ""))
            continue
        ref = next((x for x in rows if x["model"] == r["model"] and x["method"] == "decoder-only"
                    and not x.get("error")), None)
        t_rel = step_ratio(r, ref) if (r["train_step_s"] and ref) else None
        m_rel = r["peak_rss_mb"] / ref["peak_rss_mb"] if ref else float("nan")
        flat.append({k: v for k, v in r.items() if k not in ("train_step_all_s", "train_step_round_s")}
                    | {"step_vs_decoder": t_rel, "rss_vs_decoder": m_rel})
        step = f"{r['train_step_s']:.3f} s" if r["train_step_s"] else "–"
        rel = f"{t_rel:.2f}" if t_rel else "–"
        line = (f"| {r['model']} | {r['method']} | {r['batch']} | {r['trainable']:,d} | {step} | {rel} | "
                f"{r['peak_rss_mb']:,.0f} MB | {m_rel:.2f} |")
        if results["device"] == "cuda":
            g = r.get("gpu_peak_gb")
            line += f" {g:.2f} GB | {'yes' if g <= GPU_TARGET_GB else 'no'} |" if g is not None else " – | – |"
        lines.append(line)
    write_csv(out / f"{stem}_train.csv", flat, list(dict.fromkeys(k for r in flat for k in r)))
    if results["infer"]:
        lines += ["", "| model | base forward | merged tCURLoRA forward | merged / base | unmerged (adapter active) / base |",
                  "|---|---|---|---|---|"]
        for r in results["infer"]:
            lines.append(f"| {r['model']} | {r['base_s']:.3f} s | {r['merged_s']:.3f} s | {r['merged_over_base']:.2f} | "
                         f"{r['unmerged_over_base']:.2f} |")
        write_csv(out / f"{stem}_inference.csv", results["infer"],
                  ["model", "base_s", "merged_s", "unmerged_s", "merged_over_base", "unmerged_over_base", "peak_rss_mb"])
    if results["segment"]:
        lines += ["", "| segment a 256³ head (tcurlora.infer.segment, whole pipeline) | time (best of runs) | all runs | peak RSS |",
                  "|---|---|---|---|"]
        for r in results["segment"]:
            lines.append(f"| {r['what']} | {r['segment_s']:.1f} s | {', '.join(f'{t:.1f}' for t in r['segment_s_all'])} s | "
                         f"{r['peak_rss_mb']:,.0f} MB |")
        write_csv(out / f"{stem}_segment256.csv", results["segment"], ["what", "segment_s", "peak_rss_mb"])
    text = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    return text


def plot(results: dict, out: Path, stem: str = "resources") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(dict.fromkeys(r["model"] for r in results["train"]))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 3.8), dpi=100, squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in results["train"] if r["model"] == model and r["train_step_s"]]
        ref = next((r for r in rows if r["method"] == "decoder-only"), None)
        if ref is None:
            continue
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [step_ratio(r, ref) for r in rows], 0.4, label="train step")
        ax.bar(x + 0.2, [r["peak_rss_mb"] / ref["peak_rss_mb"] for r in rows], 0.4, label="peak RSS")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels([r["method"] for r in rows], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("relative to decoder-only")
        ax.set_title(f"{model} ({results['device']})", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png")
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing (tcurlora.train)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=None,
                        help="default: deepbet128 nnunet unetr-small on cpu, deepbet128 vitb nnunet on cuda")
    parser.add_argument("--batch", type=int, default=None, help="default: per model (deepbet 1, unetr-small 1, vitb 2)")
    parser.add_argument("--methods", nargs="+", default=None, help="only these rows (their labels), e.g. "
                        "'tCURLoRA r=8' 'tCURLoRA r=8, new-structure options'")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="fresh-process runs of every method, taking turns")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    parser.add_argument("--no-infer", action="store_true", help="skip the merged-inference comparison")
    parser.add_argument("--segment256", action=argparse.BooleanOptionalAction, default=None,
                        help="time segmenting the real ROBEX head with deepbet at 256³ (default: on for cpu)")
    parser.add_argument("--segment-repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks-results")
    parser.add_argument("--stem", default=None, help="output file stem (default resources or resources_cuda)")
    args = parser.parse_args(argv)
    if args.worker:
        return child_main(args.worker)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: this torch build sees no CUDA GPU")
    args.models = args.models or (["deepbet128", "vitb", "nnunet"] if args.device == "cuda" else ["deepbet128", "nnunet", "unetr-small"])
    if args.segment256 is None:
        args.segment256 = args.device == "cpu"
    stem = args.stem or ("resources" if args.device == "cpu" else "resources_cuda")
    results = run(args)
    print(write_tables(results, args.out, stem))
    plot(results, args.out, stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
