"""Why tCURLoRA teaches a base no new structure: span, scale or budget placement, measured per stack.

On the new-structure benchmark's ventricle task (``benchmarks/new_structure.py``, the same bases, cases,
steps and each method's chosen rate) this trains full fine-tuning, tCURLoRA r = 8 and LoRA r = 8 on one image
(and segments the other, for the held-out Dice), then, for every tCURLoRA stack of the base:

* **span**: how much of full fine-tuning's update ΔW_full the stack's CUR could hold at best.  Per Fourier
  slice the least-squares best core is Û = Ĉ⁺ ΔŴ R̂⁺, so the captured fraction is
  ‖P_C ΔŴ P_R‖² / ‖ΔŴ‖² (frequency-weighted over the slices; the residual is the rest).  The same for three
  reference pairs of rank-r subspaces: the top-r singular vectors of W itself (an energy choice without the
  CUR's column/row restriction), a CUR whose columns and rows are picked by the energy of the *first full
  gradient* instead of the weights (still columns and rows of 𝒲), and the top-r singular vectors of ΔW_full
  (Eckart–Young: what any rank-r core could hold).  A random pair of subspaces holds r²/(n1·n2) on average.
* **scale**: ‖ΔW‖ after training for tCURLoRA and LoRA against ‖ΔW_full‖, and the cosine of each with ΔW_full;
  the conditioning of Ĉ and R̂ (largest over smallest singular value, worst slice) and ‖Ĉ‖‖R̂‖.
* **gradient**: at the first steps, the norm of the gradient each tCURLoRA core receives, each LoRA stack's
  (its B factors; A's is zero while B is), and the full weights' gradient norm, per stack.
* **placement**: each stack's share of ‖ΔW_full‖² (encoder or decoder) against the r²·K values tCURLoRA
  gives it.

    OMP_NUM_THREADS=1 python benchmarks/diagnose_new_structure.py --base deepbet
    OMP_NUM_THREADS=1 python benchmarks/diagnose_new_structure.py --base nnunet
    python benchmarks/diagnose_new_structure.py --report        # figure from the JSON files written so far

Writes ``<out>/diagnosis_<base>.json`` and ``<out>/diagnosis_new_structure.png``.  Two images, one direction,
one seed unless asked: a diagnosis of where the method's update goes, not a new quality table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "Testing"))

from new_structure import TASKS, comparison_rates, load_base_for  # noqa: E402  (benchmarks/ is on sys.path)
from quality import BASELINE_NAMES, adapt_and_segment, weights_tag  # noqa: E402

#: (label in the tables of new_structure.py, FinetuneOptions kwargs): the three methods the diagnosis compares
METHODS = [("full fine-tuning", {"method": "full"}),
           (f"{BASELINE_NAMES['tcurlora']} r=8", {"method": "tcurlora", "rank": 8, "preset": "conv",
                                                   "new_label_recipe": False}),  # the CUR basis it diagnoses
           (f"{BASELINE_NAMES['lora']} r=8", {"method": "lora", "rank": 8, "preset": "conv"})]
#: gradients are recorded at each of this many steps from the start; their sum is "the early gradient" that the
#: gradient-picked spans are chosen from (at step 1 the body's gradient is ~0 with the low-prior head start: the
#: new channel is a copy of the background's, so their gradients cancel in the features)
FIRST_STEPS = 10


# --- the linear algebra of one stack -------------------------------------------------------------------

def _hat(x):
    """rfft along the stack axis in complex128 (the fits are small; double keeps residuals exact)."""
    import torch

    return torch.fft.rfft(x.double(), dim=0)


def _weights(k: int):
    from tcurlora.tensor import frequency_weights
    import torch

    return frequency_weights(k, torch.float64)


def _energy(x_hat, weights) -> float:
    return float((x_hat.abs().pow(2).sum(dim=(1, 2)) * weights).sum())


def _projector(basis):
    """Orthogonal projector (per slice) onto the column span of ``basis`` (F, n, r), rank-revealing."""
    import torch

    u, s, _ = torch.linalg.svd(basis, full_matrices=False)
    tol = s.amax(dim=1, keepdim=True) * max(basis.shape[1:]) * torch.finfo(torch.float64).eps
    u = u * (s > tol).unsqueeze(1)
    return u @ u.conj().transpose(1, 2)


def captured_fraction(delta_hat, left, right, weights) -> float:
    """‖P_L ΔŴ P_R‖² / ‖ΔŴ‖²: the share of ΔW the best core between these spans holds (the least-squares
    Û = L⁺ ΔŴ R⁺ of ΔW ≈ L Û R). ``left`` (F, n1, r) columns, ``right`` (F, r, n2) rows."""
    total = _energy(delta_hat, weights)
    if total == 0:
        return float("nan")
    fitted = _projector(left) @ delta_hat @ _projector(right.conj().transpose(1, 2)).conj().transpose(1, 2)
    return _energy(fitted, weights) / total


def top_subspaces(x_hat, r: int):
    """The top-r left and right singular subspaces of each slice, as (F, n1, r) and (F, r, n2)."""
    import torch

    u, _, vh = torch.linalg.svd(x_hat, full_matrices=False)
    return u[:, :, :r], vh[:, :r, :]


def best_rank_fraction(x_hat, r: int, weights) -> float:
    """Eckart–Young: the share of ‖X‖² its best tubal-rank-r approximation holds."""
    import torch

    s = torch.linalg.svdvals(x_hat)
    total = float((s.pow(2).sum(dim=1) * weights).sum())
    return float((s[:, :r].pow(2).sum(dim=1) * weights).sum()) / total if total else float("nan")


def conditioning(x_hat) -> float:
    """Largest singular value over smallest, worst slice."""
    import torch

    s = torch.linalg.svdvals(x_hat)
    return float((s[:, 0] / s[:, -1].clamp_min(1e-300)).max())


def cosine(a, b) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float((a.double() * b.double()).sum()) / (na * nb) if na and nb else float("nan")


# --- the stacks and what each method did to them ----------------------------------------------------------

def tcur_stacks(base, pristine, table):
    """The StackSpecs tCURLoRA r = 8 adapts on this base with a new head (what the runs train)."""
    from tcurlora.train import FinetuneOptions, build_adapter_config
    from tcurlora.tuners.stacks import resolve_stacks

    config = build_adapter_config(base, FinetuneOptions(method="tcurlora", rank=8, preset="conv", new_label_recipe=False),
                                  table)
    return resolve_stacks(pristine, config), config


def stack_matrix(network, spec, weight_of):
    """(K, n1, n2) fp64 of the stack's members, each weight given by ``weight_of(module)`` as a matrix."""
    import torch

    from tcurlora.tuners.layers import weight_to_matrix
    from tcurlora.tuners.stacks import find

    mats = []
    for m in spec.members:
        module = find(network, m.module)
        w = weight_to_matrix(module, weight_of(module, m.module)).double()
        mats.append(w[m.rows[0]:m.rows[1]] if m.rows else w)
    return torch.stack(mats)


def in_decoder(module: str, patterns) -> bool:
    """Whether a module lies under one of the base's decoder modules (regular expressions of module names)."""
    from tcurlora.tuners.stacks import matches

    parts = module.split(".")
    return any(matches(".".join(parts[:i]), patterns) for i in range(1, len(parts) + 1))


def merged_network(pristine, adapter_path):
    """A copy of the base with the adapter file loaded and merged into its weights."""
    from tcurlora.adapter import merge_adapter, set_active_adapter
    from tcurlora.adapter_file import load_adapter

    network = copy.deepcopy(pristine)
    load_adapter(network, str(adapter_path), adapter_name="diagnosis")
    set_active_adapter(network, "diagnosis")
    merge_adapter(network)
    return network


def effective_weight(module, name):
    # a PEFT LoRA layer's weight is its base layer's (merged); the tCURLoRA wrapper merges into its base layer
    return module.weight.detach()


def first_gradients(base, pristine, pair, options, table, specs, steps: int = FIRST_STEPS) -> dict:
    """Per stack, the gradient norms over the first ``steps`` training steps of ``options``' method: the
    full weights' (method full; also returned summed over the steps, as matrices), the tCURLoRA cores', LoRA's B
    and A; and how far the new label's head channel is from the background's (‖w_new − w_bg‖), per step."""
    import tempfile

    import torch

    from tcurlora.adapter import inject_adapter
    from tcurlora.events import Events
    from tcurlora.train import Training, seed_everything
    from tcurlora.train.setup import _start_new_head, set_up_run
    from tcurlora.tuners import get_tuner
    from tcurlora.tuners.stacks import find

    base.network = network = copy.deepcopy(pristine)
    with tempfile.TemporaryDirectory() as tmp:  # the run's files are never written: only its steps are taken
        run = set_up_run(base, [pair], Path(tmp) / "diagnosis.safetensors", [], table, options, Events(),
                         resume=False, start_from=None)
    seed_everything(options.seed)
    inject_adapter(network, run.config, "finetune")
    _start_new_head(network, base, run.table)  # the low-prior start the diagnosis measured (no prototypes)
    training = Training(run)
    record = get_tuner(network).record("finetune")
    norms = {spec.name: [] for spec in specs}
    first_full = {}
    head = record.new_head()
    separation = []
    for step in range(1, steps + 1):
        training.train_step(step)
        w = head.weight.detach()
        w = w.transpose(0, 1) if isinstance(head, torch.nn.modules.conv._ConvTransposeNd) else w
        separation.append(float((w[1] - w[0]).norm()))
        for spec in specs:
            if options.method == "full":
                g = stack_matrix(network, spec, lambda module, _: module.weight.grad)
                norms[spec.name].append(float(g.norm()))
                first_full[spec.name] = g + first_full.get(spec.name, 0)
            elif options.method == "tcurlora":
                norms[spec.name].append(float(record.stacks[spec.name].delta_u.grad.norm()))
            else:  # PEFT LoRA: B (zero at start) gets the gradient first
                b = a = 0.0
                for m in spec.members:
                    layer = find(network, m.module)
                    if hasattr(layer, "lora_B"):
                        b += float(layer.lora_B["finetune"].weight.grad.norm()) ** 2
                        a += float(layer.lora_A["finetune"].weight.grad.norm()) ** 2
                norms[spec.name].append({"B": math.sqrt(b), "A": math.sqrt(a)})
    base.network = copy.deepcopy(pristine)
    return {"norms": norms, "first_full": first_full, "head_separation": separation}


def diagnose(args) -> dict:
    import torch

    from tcurlora.metrics import evaluate
    from tcurlora.tensor import select_indices
    from tcurlora.train import FinetuneOptions

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    table, names, case_files = TASKS["ventricles"]
    cases = case_files(Path(args.work) / "cases")
    train, test = names if args.direction == 0 else names[::-1]
    base, resolution = load_base_for(args)
    pristine = copy.deepcopy(base.network)
    rates = comparison_rates(out)
    specs, _ = tcur_stacks(base, pristine, table)
    work = Path(args.work) / "diagnosis" / args.base
    work.mkdir(parents=True, exist_ok=True)

    runs, deltas, grads = {}, {}, {}
    for label, kwargs in METHODS:
        options = FinetuneOptions(steps=args.steps, batch_size=1, seed=args.seed, device="cpu",
                                  val_every=10 ** 6, lr=rates[label], head_start="low-prior", **kwargs)
        tag = kwargs["method"]
        seg = work / f"{tag}_{train}_to_{test}_s{args.seed}.nii.gz"
        seen = seg.with_name(seg.name.replace(".nii.gz", "_train.nii.gz"))
        t0 = time.time()
        got = adapt_and_segment(base, pristine, cases[train], options, [(cases[test][0], seg), (cases[train][0], seen)],
                                labels=table, largest_component=False)
        dice = evaluate([str(seg)], [cases[test][1]], label_table=table)[0]["dice"]
        fit = evaluate([str(seen)], [cases[train][1]], label_table=table)[0]["dice"]
        runs[label] = {"lr": options.lr, "dice": dice, "dice_train_case": fit, "trainable": got["trainable"],
                       "train_s": round(got["train_s"], 1), "final_loss": got["final_loss"]}
        print(f"{args.base} {label}: held-out Dice {dice:.3f}, fit {fit:.3f}, {got['trainable']:,} values, "
              f"{time.time() - t0:.0f} s", flush=True)
        merged = merged_network(pristine, seg.with_name(seg.name.replace(".nii.gz", ".safetensors")))
        deltas[label] = {s.name: stack_matrix(merged, s, effective_weight) - stack_matrix(pristine, s, effective_weight)
                         for s in specs}
        grads[label] = first_gradients(base, pristine, cases[train], options, table, specs)
        print(f"  first gradients of {label} recorded", flush=True)

    full, tcur, lora = (label for label, _ in METHODS)
    decoder = list(base.decoder_modules)
    rows = []
    for spec in specs:
        w = stack_matrix(pristine, spec, effective_weight)
        k, n1, n2 = w.shape
        r = min(8, n1, n2)
        weights = _weights(k)
        w_hat = _hat(w)
        d_full = deltas[full][spec.name]
        d_hat = _hat(d_full)
        cols, rows_ = select_indices(w.float(), r)
        c_hat, r_hat = w_hat[:, :, cols], w_hat[:, rows_, :]
        g1 = grads[full]["first_full"][spec.name]
        g_cols, g_rows = select_indices(g1.float(), r)
        g_hat = _hat(g1)
        u_w, v_w = top_subspaces(w_hat, r)
        u_g, v_g = top_subspaces(g_hat, r)
        tcur_norms = grads[tcur]["norms"][spec.name]
        rows.append({
            "stack": spec.name, "members": [m.module for m in spec.members], "k": k, "n1": n1, "n2": n2, "rank": r,
            "decoder": all(in_decoder(m.module, decoder) for m in spec.members),
            "tcur_values": r * r * k,
            "norm_w": float(w.norm()),
            "norm_delta_full": float(d_full.norm()),
            "norm_delta_tcurlora": float(deltas[tcur][spec.name].norm()),
            "norm_delta_lora": float(deltas[lora][spec.name].norm()),
            "cos_tcurlora_full": cosine(deltas[tcur][spec.name], d_full),
            "cos_lora_full": cosine(deltas[lora][spec.name], d_full),
            "captured_cur": captured_fraction(d_hat, c_hat, r_hat, weights),
            "captured_svd_w": captured_fraction(d_hat, u_w, v_w, weights),
            "captured_cur_first_gradient": captured_fraction(d_hat, w_hat[:, :, g_cols], w_hat[:, g_rows, :], weights),
            "captured_svd_first_gradient": captured_fraction(d_hat, u_g, v_g, weights),
            "captured_best_rank_r": best_rank_fraction(d_hat, r, weights),
            "captured_random": r * r / (n1 * n2),
            "first_gradient_in_cur_span": captured_fraction(g_hat, c_hat, r_hat, weights),
            "first_gradient_in_gradient_cur_span": captured_fraction(g_hat, w_hat[:, :, g_cols], w_hat[:, g_rows, :],
                                                                     weights),
            "cond_c": conditioning(c_hat), "cond_r": conditioning(r_hat),
            "norm_c_times_r": float(torch.linalg.matrix_norm(c_hat, 2).max() * torch.linalg.matrix_norm(r_hat, 2).max()),
            "grad_full": grads[full]["norms"][spec.name],
            "grad_tcurlora_core": tcur_norms,
            "grad_lora": grads[lora]["norms"][spec.name],
            "cur_columns": cols.tolist(), "cur_rows": rows_.tolist(),
            "first_gradient_columns": g_cols.tolist(), "first_gradient_rows": g_rows.tolist(),
        })
    total = sum(row["norm_delta_full"] ** 2 for row in rows)
    for row in rows:
        row["share_of_full_update"] = row["norm_delta_full"] ** 2 / total if total else float("nan")
    result = {"head_separation": {label: grads[label]["head_separation"] for label, _ in METHODS}, "base": args.base, "weights": weights_tag(pristine), "task": "ventricles", "train": train, "test": test,
              "seed": args.seed, "steps": args.steps, "resolution": resolution, "runs": runs, "stacks": rows,
              "first_steps": FIRST_STEPS}
    path = out / f"diagnosis_{args.base}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    return result


# --- the figure -------------------------------------------------------------------------------------------

SPANS = [("captured_cur", "CUR of W (tCURLoRA)", "tab:red"),
         ("captured_svd_w", "top-r SVD of W", "tab:orange"),
         ("captured_cur_first_gradient", "CUR picked by the first gradient", "tab:green"),
         ("captured_svd_first_gradient", "top-r SVD of the first gradient", "tab:olive"),
         ("captured_best_rank_r", "best rank r of ΔW_full", "tab:blue"),
         ("captured_random", "random subspaces (expected)", "grey")]


def plot(results: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(4, len(results), figsize=(max(8, 0.42 * max(len(r["stacks"]) for r in results)) * len(results), 16),
                             dpi=100, squeeze=False)
    for col, res in enumerate(results):
        rows = res["stacks"]
        x = np.arange(len(rows))
        labels = [("D " if r["decoder"] else "E ") + r["stack"] + f" ×{r['k']}" for r in rows]
        ax = axes[0, col]
        width = 0.8 / len(SPANS)
        for i, (key, name, colour) in enumerate(SPANS):
            ax.bar(x + (i - len(SPANS) / 2 + 0.5) * width, [r[key] for r in rows], width, color=colour, label=name)
        ax.set_ylabel("share of ‖ΔW_full‖² a rank-r core\nbetween these spans holds (LS fit)")
        ax.set_title(f"{res['base']}: span — ventricles, {res['train']} → {res['test']}, {res['steps']} steps")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7, ncol=3)
        ax = axes[1, col]
        for key, name, colour, dx in (("norm_delta_full", "full fine-tuning", "tab:blue", -0.27),
                                      ("norm_delta_tcurlora", "tCURLoRA r=8", "tab:red", 0.0),
                                      ("norm_delta_lora", "LoRA r=8", "tab:purple", 0.27)):
            ax.bar(x + dx, [max(r[key], 1e-9) for r in rows], 0.27, color=colour, label=name)
        ax.set_yscale("log")
        ax.set_ylim(bottom=1e-2)  # LoRA leaves transposed convolutions alone (PEFT has no such layer): no bar
        ax.set_ylabel("‖ΔW‖ after training (Frobenius)")
        runs = res["runs"]
        ax.set_title("scale — held-out Dice: " + ", ".join(f"{k} {v['dice']:.2f} (fit {v['dice_train_case']:.2f})"
                                                          for k, v in runs.items()), fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[2, col]
        ax.bar(x - 0.3, [max(r["grad_full"][-1], 1e-12) for r in rows], 0.3, color="tab:blue", label="‖∂L/∂W‖ (full)")
        ax.bar(x, [max(r["grad_tcurlora_core"][-1], 1e-12) for r in rows], 0.3, color="tab:red",
               label="‖∂L/∂ΔU‖ (tCURLoRA core)")
        ax.bar(x + 0.3, [max(r["grad_lora"][-1]["B"], 1e-12) for r in rows], 0.3, color="tab:purple",
               label="‖∂L/∂B‖ (LoRA)")
        ax2 = ax.twinx()
        ax2.plot(x, [r["share_of_full_update"] for r in rows], "k.-", label="share of ‖ΔW_full‖²")
        ax2.set_ylabel("share of full fine-tuning's update")
        ax.set_yscale("log")
        ax.set_ylim(bottom=1e-5)
        ax.set_ylabel(f"gradient norm, step {res['first_steps']}")
        ax.set_title("gradient and placement (D: decoder stack, E: encoder or mixed)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        ax2.legend(fontsize=7, loc="upper right")
        ax = axes[3, col]
        steps = np.arange(1, res["first_steps"] + 1)
        total = lambda key, pick=lambda v: v: np.sqrt(np.sum([np.square([pick(v) for v in r[key]]) for r in rows], axis=0))
        ax.semilogy(steps, total("grad_full"), "o-", color="tab:blue", label="‖∂L/∂W‖, all stacks (full)")
        ax.semilogy(steps, total("grad_tcurlora_core"), "o-", color="tab:red", label="‖∂L/∂ΔU‖, all stacks (tCURLoRA)")
        ax.semilogy(steps, total("grad_lora", lambda v: v["B"]), "o-", color="tab:purple", label="‖∂L/∂B‖, all stacks (LoRA)")
        ax2 = ax.twinx()
        for (label, sep), colour in zip(res["head_separation"].items(), ("tab:blue", "tab:red", "tab:purple")):
            ax2.plot(steps, sep, "--", color=colour, label=f"‖w_label − w_background‖ of the head ({label})")
        ax2.set_ylabel("head: label channel − background channel")
        ax.set_xlabel("training step")
        ax.set_title("the body's gradient grows only as the new head's label channel leaves the background's", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax2.legend(fontsize=6, loc="center right")
        ax.grid(alpha=0.3)
        for a in axes[:3, col]:
            a.set_xticks(x)
            a.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
            a.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def totals(res: dict) -> dict:
    """Weighted over the stacks by their share of ‖ΔW_full‖²: the share of full fine-tuning's whole update each
    kind of span holds, and the encoder/decoder split of that update and of tCURLoRA's values."""
    rows = res["stacks"]
    out = {key: sum(r[key] * r["share_of_full_update"] for r in rows) for key, _, _ in SPANS}
    grad = {r["stack"]: r["grad_full"][-1] ** 2 for r in rows}
    out["early_gradient_in_cur_span"] = (sum(r["first_gradient_in_cur_span"] * grad[r["stack"]] for r in rows)
                                         / sum(grad.values()))
    out["decoder_share_of_full_update"] = sum(r["share_of_full_update"] for r in rows if r["decoder"])
    out["decoder_share_of_gradient"] = sum(grad[r["stack"]] for r in rows if r["decoder"]) / sum(grad.values())
    values = sum(r["tcur_values"] for r in rows)
    out["decoder_share_of_tcur_values"] = sum(r["tcur_values"] for r in rows if r["decoder"]) / values
    for method in ("full", "tcurlora", "lora"):
        out[f"norm_delta_{method}"] = math.sqrt(sum(r[f"norm_delta_{method}"] ** 2 for r in rows))
    return out


def markdown(results: list) -> str:
    """Per base: the held-out runs, the weighted totals and the per-stack table."""
    lines = []
    for res in results:
        t = totals(res)
        lines += [f"### {res['base']} (ventricles, train {res['train']}, test {res['test']}, {res['steps']} steps, "
                  f"seed {res['seed']}, base weights {res['weights']})", "",
                  "| method | lr | held-out Dice | fit (training image) | trainable values | ‖ΔW‖ over the stacks |",
                  "|---|---|---|---|---|---|"]
        for (label, _), key in zip(METHODS, ("full", "tcurlora", "lora")):
            run = res["runs"][label]
            lines.append(f"| {label} | {run['lr']:g} | {run['dice']:.3f} | {run['dice_train_case']:.3f} | "
                         f"{run['trainable']:,d} | {t['norm_delta_' + key]:.3f} |")
        lines += ["", "Share of ‖ΔW_full‖² that the least-squares best core between each pair of spans holds "
                  "(weighted over the stacks):", "", "| span | share |", "|---|---|"]
        lines += [f"| {name} | {t[key]:.3f} |" for key, name, _ in SPANS]
        lines += ["", f"The early gradient (full fine-tuning's, summed over steps 1–{res['first_steps']}) has "
                  f"{t['early_gradient_in_cur_span']:.3f} of its squared norm in the CUR spans (weighted over the "
                  "stacks by the last step's squared gradient).", "",
                  f"Decoder stacks hold {t['decoder_share_of_full_update']:.0%} of ‖ΔW_full‖², "
                  f"{t['decoder_share_of_gradient']:.0%} of the squared gradient at step {res['first_steps']} and "
                  f"{t['decoder_share_of_tcur_values']:.0%} of tCURLoRA's core values.", "",
                  "| stack | K | n1×n2 | decoder | share of ‖ΔW_full‖² | CUR | SVD(W) | CUR by gradient | best rank r "
                  "| random | early gradient in CUR span | ‖ΔW‖ full / tCUR / LoRA | cos(ΔW, ΔW_full) tCUR / LoRA | cond Ĉ / R̂ | "
                  f"grad step 1 → {res['first_steps']}: full ‖∂L/∂W‖ | tCUR ‖∂L/∂ΔU‖ | LoRA ‖∂L/∂B‖ |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["stacks"]:
            lines.append(
                f"| {r['stack']} | {r['k']} | {r['n1']}×{r['n2']} | {'yes' if r['decoder'] else 'no'} | "
                f"{r['share_of_full_update']:.3f} | {r['captured_cur']:.3f} | {r['captured_svd_w']:.3f} | "
                f"{r['captured_cur_first_gradient']:.3f} | {r['captured_best_rank_r']:.3f} | {r['captured_random']:.3f} | "
                f"{r['first_gradient_in_cur_span']:.3f} | {r['norm_delta_full']:.3f} / {r['norm_delta_tcurlora']:.3f} / {r['norm_delta_lora']:.3f} | "
                f"{r['cos_tcurlora_full']:.2f} / {r['cos_lora_full']:.2f} | {r['cond_c']:.0f} / {r['cond_r']:.0f} | "
                f"{r['grad_full'][0]:.1e} → {r['grad_full'][-1]:.1e} | "
                f"{r['grad_tcurlora_core'][0]:.1e} → {r['grad_tcurlora_core'][-1]:.1e} | "
                f"{r['grad_lora'][0]['B']:.1e} → {r['grad_lora'][-1]['B']:.1e} |")
        sep = res["head_separation"]
        lines += ["", "‖w_label − w_background‖ of the new head over the first steps: " + "; ".join(
            f"{label} {v[0]:.3g} → {v[-1]:.3g}" for label, v in sep.items()), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", choices=["deepbet", "nnunet"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--direction", type=int, choices=[0, 1], default=0,
                        help="0: the task's first image to its second (cat12 -> mni152); 1: back")
    parser.add_argument("--resolution", type=int, default=96, help="deepbet model input")
    parser.add_argument("--report", action="store_true", help="only draw the figure from the JSON files")
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "benchmarks-results"))
    parser.add_argument("--work", default=None)
    parser.add_argument("--nnunet-work", default=None)
    args = parser.parse_args(argv)
    from tcurlora.fetch import cache_dir

    args.work = args.work or str(cache_dir() / "benchmarks" / "work" / "new_structure")
    args.nnunet_work = args.nnunet_work or str(cache_dir() / "benchmarks" / "new_structure_nnunet")
    out = Path(args.out)
    if not args.report:
        if not args.base:
            parser.error("--base is required (or --report)")
        diagnose(args)
    results = [json.loads((out / f"diagnosis_{b}.json").read_text()) for b in ("deepbet", "nnunet")
               if (out / f"diagnosis_{b}.json").is_file()]
    plot(results, out / "diagnosis_new_structure.png")
    text = markdown(results)
    (out / "diagnosis_new_structure.md").write_text(
        "# New-structure diagnosis: the numbers\n\nWritten by `benchmarks/diagnose_new_structure.py` from "
        "`diagnosis_<base>.json`; what they mean: `docs/new_structure.md`.\n\n" + text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
