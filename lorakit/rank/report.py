"""Showing what `analyze` found: a table for the terminal and a figure in the style of the LoRA paper's Figures 3-4
(per layer type: the normalised singular values of each layer's ΔW, and the subspace similarity φ as a heatmap)."""

from __future__ import annotations

import re
from pathlib import Path

_LAYER = re.compile(r"\.(\d+)\.")


def layer_type(path: str) -> str:
    """A module's layer type for grouping: the last name of its path (`...layer.3.attention.self.query`: `query`)."""
    return path.rsplit(".", 1)[-1]


def layer_index(path: str) -> int | None:
    """The first number in a dotted module path (the transformer block), else None."""
    found = _LAYER.search(f".{path}.")
    return int(found.group(1)) if found else None


def table(result: dict) -> str:
    """One line per module: r, ‖ΔW‖_F, effective ranks, the top singular values, and with --base / --compare the
    relative norm, amplification (random baseline) and φ at (1, 1) and (r, r); ‖s·c‖ for lora_bias adapters."""
    modules = result["modules"]
    with_base = any("relative_norm" in m for m in modules.values())
    with_cmp = any("similarity" in m for m in modules.values())
    with_bias = any("bias_norm" in m for m in modules.values())
    header = ["module", "r", "norm", "eff90", "eff99", "top singular values"]
    header += ["rel norm", "amplif", "random"] if with_base else []
    header += ["phi(1,1)", "phi(r,r)"] if with_cmp else []
    header += ["bias norm"] if with_bias else []
    rows = []
    for path, m in modules.items():
        row = [path, m["r"], f"{m['norm']:.4g}", m["effective_rank_90"], m["effective_rank_99"],
               " ".join(f"{s:.3g}" for s in m["singular_values"][:4]) + (" ..." if len(m["singular_values"]) > 4 else "")]
        if with_base:
            amp = m["amplification"]
            row += [f"{m['relative_norm']:.3g}", _num(amp["factor"]), _num(amp["random"])]
        if with_cmp:
            grid = m.get("similarity", {}).get("grid")
            n = min(len(grid), len(grid[0])) if grid else 0
            row += [f"{grid[0][0]:.3f}", f"{grid[n - 1][n - 1]:.3f}"] if grid else ["-", "-"]
        if with_bias:
            row += [f"{m['bias_norm']:.4g}" if "bias_norm" in m else "-"]
        rows.append([str(x) for x in row])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    notes = []
    if with_cmp:
        source = next(m["similarity"]["of"] for m in modules.values() if "similarity" in m)
        notes.append(f"phi: subspace similarity from the {source}")
    if with_base:
        notes.append("amplif: ||dW||_F / ||U^T W V^T||_F with dW's top-r singular vectors; random: the same with "
                     "those of a random matrix")
    return "\n".join(lines + notes)


def _num(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def plot(result: dict, path: str | Path, title: str = "") -> Path:
    """A PNG: one row per layer type; left the singular values of each layer's ΔW (normalised by the largest),
    right (with a comparison) φ(i, j) averaged over the layers of that type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[tuple[str, dict]]] = {}
    for name, m in result["modules"].items():
        groups.setdefault(layer_type(name), []).append((name, m))
    with_cmp = any("similarity" in m for m in result["modules"].values())
    cols = 2 if with_cmp else 1
    fig, axes = plt.subplots(len(groups), cols, figsize=(5.5 * cols, 3.2 * len(groups)), squeeze=False)
    for row, (kind, members) in enumerate(sorted(groups.items())):
        ax = axes[row][0]
        for name, m in members:
            sigma = m["singular_values"]
            top = sigma[0] if sigma and sigma[0] > 0 else 1.0
            ax.plot(range(1, len(sigma) + 1), [s / top for s in sigma], marker=".", label=f"layer {layer_index(name)}")
        ax.set(title=f"{kind}: singular values of ΔW", xlabel="i", ylabel="σ_i / σ_1", yscale="log")
        ax.legend(fontsize=6, ncol=2)
        if with_cmp:
            _heatmap(axes[row][1], kind, [m["similarity"] for _, m in members if "similarity" in m], fig)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _heatmap(ax, kind: str, sims: list[dict], fig) -> None:
    import torch

    if not sims:
        ax.set_axis_off()
        return
    grid = torch.tensor([s["grid"] for s in sims]).mean(0)
    image = ax.imshow(grid.numpy(), vmin=0, vmax=1, origin="lower", aspect="auto", cmap="viridis",
                      extent=(0.5, grid.shape[1] + 0.5, 0.5, grid.shape[0] + 0.5))
    ax.set(title=f"{kind}: φ(i, j), mean of {len(sims)} layers", xlabel="j (compared adapter)", ylabel="i")
    fig.colorbar(image, ax=ax)
