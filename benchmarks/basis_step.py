"""How far one core step moves each stack's ΔW in the CUR basis and in the orthonormal basis, on the two bases
of the new-structure benchmark (tCURLoRA r = 8, the conv preset).

An Adam step moves every core entry by about the learning rate, so the step is modelled as a core of ±1
entries (one fixed draw, the same for both bases of a stack): ‖Δ𝒲‖ of that core is what one step at rate 1
moves the stack by. In the orthonormal basis it depends on the rank and the stack's K only; in the CUR basis
it follows the norms of the stack's own columns and rows, so the basis decides where the steps go.

    OMP_NUM_THREADS=1 python benchmarks/basis_step.py     # < 1 min once both bases are cached

Writes ``docs/benchmarks-results/basis_step.md``.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from quality import load_benchmark_base  # noqa: E402  (benchmarks/ is on sys.path as a script)


def stack_steps(base) -> list:
    """(stack, shape, decoder?, ‖Δ𝒲‖ CUR, ‖Δ𝒲‖ orthonormal, ‖𝒲‖) per stack for a ±1 core, the stacks a new
    label's adapter has (the base's head is the new head's, not a stack)."""
    import torch

    from tcurlora.config import TCURLoRAConfig
    from tcurlora.tuners.layers import TCURStack
    from tcurlora.tuners.stacks import decoder_names, member_matrix, resolve_stacks, under

    network = base.network
    decoder_modules = decoder_names(network, base.decoder_modules)
    config = TCURLoRAConfig(rank=8, preset="conv", new_head={"module": base.head, "out_channels": 2})
    out = []
    for spec in resolve_stacks(network, config):
        w = torch.stack([member_matrix(network, m) for m in spec.members]).float()
        step = {}
        for basis in ("cur", "orthonormal"):
            stack = TCURStack(spec.name, spec.members, w, 8, basis=basis)
            signs = torch.randint(0, 2, stack.delta_u.shape, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                stack.delta_u.copy_(signs.float() * 2 - 1)
            step[basis] = float(stack.delta_w(detached=True).norm())
        decoder = all(under(m.module, decoder_modules) for m in spec.members)
        out.append((spec.name, tuple(w.shape), decoder, step["cur"], step["orthonormal"], float(w.norm())))
    return out


def main() -> int:
    import torch

    import new_structure as ns
    from tcurlora.fetch import cache_dir
    from tcurlora.models import load_base

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    bases = {"deepbet": load_benchmark_base("deepbet", 96),
             "nnunet": load_base(str(ns.build_nnunet_base(cache_dir() / "benchmarks" / "new_structure_nnunet")),
                                 fold=0)}
    lines = ["# One core step in the CUR basis and in the orthonormal basis", "",
             "Written by `benchmarks/basis_step.py`: ‖Δ𝒲‖ of a core of ±1 entries (what one Adam step at rate 1 "
             "moves a stack by), tCURLoRA r = 8, conv preset.", ""]
    for name, base in bases.items():
        rows = stack_steps(base)
        total = {k: math.sqrt(sum(r[i] ** 2 for r in rows)) for k, i in (("cur", 3), ("orthonormal", 4))}
        part = {}
        for where, flag in (("encoder", False), ("decoder", True)):
            sub = [r for r in rows if r[2] == flag]
            part[where] = (math.sqrt(sum(r[3] ** 2 for r in sub)), math.sqrt(sum(r[4] ** 2 for r in sub)))
        summary = (f"**{name}**: all stacks CUR {total['cur']:.1f}, orthonormal {total['orthonormal']:.1f} "
                   f"(×{total['cur'] / total['orthonormal']:.2f}); encoder stacks CUR {part['encoder'][0]:.1f} / "
                   f"orthonormal {part['encoder'][1]:.1f} (×{part['encoder'][0] / part['encoder'][1]:.2f}); decoder "
                   f"stacks {part['decoder'][0]:.1f} / {part['decoder'][1]:.1f} "
                   f"(×{part['decoder'][0] / part['decoder'][1]:.2f})")
        lines += [summary, "",
                  "| stack | K × n1 × n2 | decoder | ‖Δ𝒲‖ CUR | ‖Δ𝒲‖ orthonormal | CUR / orthonormal | ‖𝒲‖ |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r[0]} | {' × '.join(map(str, r[1]))} | {'yes' if r[2] else ''} | {r[3]:.2f} | {r[4]:.2f} | "
                  f"{r[3] / r[4]:.2f} | {r[5]:.2f} |" for r in rows]
        lines.append("")
        print(summary)
    out = HERE.parent / "docs" / "benchmarks-results" / "basis_step.md"
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
