"""The rank commands of the `lorakit` command line: analyze, extract, resize, combine (registered by cli/main.py).

Each checks its options before any work and reports a bad one as `Error: ...` with exit code 1 (cli/feedback.py's
`user_errors`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .examples import help_examples
from .feedback import user_errors
from .options import switch


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--weights must be comma-separated numbers, got {text!r}") from None


def analyze(
    adapter: str = typer.Argument(..., help="Adapter directory (lorakit's or PEFT's)."),
    base: Optional[str] = typer.Option(None, help="Base model: adds ‖ΔW‖/‖W‖ and the amplification factor "
                                       "(with a random-matrix baseline). A DoRA adapter needs it (or its base named "
                                       "in adapter_config.json)."),
    compare: Optional[str] = typer.Option(None, help="Another adapter of the same base: the subspace similarity "
                                          "φ(i, j) per module."),
    similarity_of: str = typer.Option("A", help="φ from the right singular vectors of A (the paper's) or of ΔW "
                                      "(delta)."),
    as_json: bool = switch("--json", help="Print one JSON object instead of the table."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG: singular values per layer type, φ heatmaps."),
):
    """Singular values, effective rank, norm (and with --base amplification, with --compare subspace similarity)
    of every module's ΔW."""
    from ..rank.analyze import analyze as run
    from ..rank.report import plot as draw
    from ..rank.report import table

    with user_errors():
        if plot is not None and plot.suffix.lower() != ".png":
            raise ValueError(f"--plot must name a .png file, got {plot}")
        result = run(adapter, base=base, compare=compare, similarity_of=similarity_of)
        if plot is not None:
            draw(result, plot, title=Path(adapter).name)
        typer.echo(json.dumps(result) if as_json else table(result))


def extract(
    base: str = typer.Option(..., help="The model before fine-tuning (directory or hub id, safetensors)."),
    tuned: str = typer.Option(..., help="The fully fine-tuned model (same architecture, safetensors)."),
    output: Path = typer.Option(..., help="Adapter directory to write."),
    r: Optional[int] = typer.Option(None, "--r", help="Rank of every module."),
    energy: Optional[float] = typer.Option(None, help="Per-module rank: the fewest directions holding this share of "
                                           "‖ΔW‖²_F (written as rank_pattern)."),
    targets: Optional[str] = typer.Option(None, help="Modules to factor, comma-separated names or suffixes "
                                          "(default: all-linear)."),
    heads_only: bool = switch("--heads-only", help="Keep only changed task heads besides the LoRA "
                              "factors; drop other changed tensors (LayerNorms, embeddings, biases)."),
):
    """Turn a full fine-tune into a LoRA adapter by truncated SVD of W_tuned − W_base, shard by shard."""
    from ..rank.extract import extract as run
    from ..training.settings import parse_targets

    with user_errors():
        report = run(base, tuned, output, r=r, energy=energy, targets=parse_targets(targets), heads_only=heads_only)
        for path, m in report["modules"].items():
            typer.echo(f"{path}  r={m['r']}  relative error {m['relative_error']:.4f}  energy kept "
                       f"{m['energy_kept']:.4f}")
        typer.echo(f"modules_to_save: {', '.join(report['modules_to_save']) or 'none'}; bias: {report['bias']}")
        if report["dropped"]:
            typer.echo(f"dropped (--heads-only): {', '.join(report['dropped'])}")
        typer.echo(f"wrote {output}")


def resize(
    adapter: str = typer.Argument(..., help="Adapter directory."),
    output: Path = typer.Option(..., help="Adapter directory to write."),
    r: Optional[int] = typer.Option(None, "--r", help="New rank (a module keeps its rank if that is lower)."),
    energy: Optional[float] = typer.Option(None, help="Per-module rank keeping this share of ‖ΔW‖²_F."),
):
    """Re-factor an adapter to a lower rank by SVD of each ΔW (exact when the new rank >= the old)."""
    from ..rank.resize import resize as run

    with user_errors():
        report = run(adapter, output, r=r, energy=energy)
        for path, m in report.items():
            typer.echo(f"{path}  r {m['r_old']} -> {m['r']}  energy kept {m['energy_kept']:.4f}")
        typer.echo(f"wrote {output}")


def combine(
    adapters: list[str] = typer.Argument(..., help="Adapter directories of one base model."),
    weights: Optional[str] = typer.Option(None, help="Comma-separated weight per adapter (default: 1 each)."),
    method: str = typer.Option("linear", help="linear | cat | svd | ties | dare_linear | dare_ties (as PEFT's "
                               "add_weighted_adapter)."),
    density: Optional[float] = typer.Option(None, help="ties/dare: the share of entries kept, in (0, 1]."),
    seed: int = typer.Option(0, help="dare: seed of the random masks."),
    r: Optional[int] = typer.Option(None, "--r", help="svd: rank of the result (default: the largest input rank)."),
    output: Path = typer.Option(..., help="Adapter directory to write."),
):
    """Combine adapters into one (PEFT's add_weighted_adapter semantics); heads must share one label set."""
    from ..rank.combine import combine as run

    with user_errors():
        values = _floats(weights) if weights is not None else [1.0] * len(adapters)
        ranks = run(adapters, values, output, method=method, density=density, seed=seed, r=r)
        typer.echo(f"combined {len(adapters)} adapters ({method}) into {len(ranks)} modules, ranks "
                   f"{sorted(set(ranks.values()))}; wrote {output}")


def register(app: typer.Typer) -> None:
    """Add the rank commands to the main typer app."""
    for command in (analyze, extract, resize, combine):
        app.command(command.__name__, epilog=help_examples(command.__name__))(command)
