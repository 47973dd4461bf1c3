"""`lorakit export`: a trained run as what llama.cpp, Ollama or vLLM load (registered on the main app in cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import ConfigError
from .feedback import user_errors
from .options import switch

FORMATS = ("gguf", "gguf-lora", "vllm")


def export(
    adapter: str = typer.Option(..., help="Adapter directory (a run directory of lorakit train)."),
    format: str = typer.Option(..., "--format", help="gguf: the merged model as one GGUF file (llama.cpp, Ollama) | "
                               "gguf-lora: the adapter alone as a llama.cpp LoRA GGUF | vllm: the adapter checked "
                               "and written for vLLM's --lora-modules"),
    output: str = typer.Option(..., help="The GGUF file (gguf, gguf-lora) or the adapter directory (vllm)."),
    outtype: str = typer.Option("f16", help="GGUF weights: f32 | f16 | bf16 | q8_0 (norms stay f32)"),
    base_output: Optional[str] = typer.Option(None, help="gguf-lora: also write the base model as a GGUF file here "
                                              "(a QLoRA run's base as the NF4 weights it trained on, dequantized)."),
    ollama: bool = switch("--ollama", help="gguf, gguf-lora: write an Ollama Modelfile beside it."),
    model: Optional[str] = typer.Option(None, help="Base model (default: the adapter's base model)"),
    max_lora_rank: int = typer.Option(16, help="vllm: the --max-lora-rank vLLM will run with (vLLM's default: 16)"),
    name: Optional[str] = typer.Option(None, help="vllm: the adapter's name in --lora-modules (default: the "
                                       "output directory's name)"),
    overwrite: bool = switch("--overwrite", help="Replace outputs that exist."),
):
    """Export a run for llama.cpp / Ollama (GGUF, merged or as a separate LoRA) or for vLLM."""
    with user_errors():
        out = Path(output)
        base_out = Path(base_output) if base_output else None
        _check_options(format, outtype, out, base_out, ollama, overwrite)
        if format == "vllm":
            from ..deploy.vllm import write

            for line in write(Path(adapter), out, name or out.name, max_lora_rank, model):
                typer.echo(line)
            return
        _export_gguf(adapter, model, format, out, outtype, base_out, ollama)


def _check_options(format: str, outtype: str, out: Path, base_out: Path | None, ollama: bool, overwrite: bool) -> None:
    # Everything the flags alone can tell, before any model loads.
    from ..deploy.gguf import OUTTYPES

    if format not in FORMATS:
        raise ConfigError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    if format != "vllm" and outtype not in OUTTYPES:
        raise ConfigError(f"--outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    if base_out and format != "gguf-lora":
        raise ConfigError("--base-output goes with --format gguf-lora (the merged GGUF needs no base)")
    if ollama and format == "vllm":
        raise ConfigError("--ollama goes with --format gguf or gguf-lora")
    if ollama and format == "gguf-lora" and base_out is None:
        raise ConfigError("--ollama with --format gguf-lora needs --base-output: the Modelfile's FROM")
    targets = [out] + ([base_out] if base_out else []) + ([out.parent / "Modelfile"] if ollama else [])
    for path in targets:
        if path.exists() and not overwrite and (path.is_file() or any(path.iterdir())):
            raise ConfigError(f"{path} exists; pass --overwrite to replace it")
        if format != "vllm" and path.is_dir():
            raise ConfigError(f"--output {path} is a directory; give the GGUF file's path")
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)


def _export_gguf(adapter: str, model: str | None, format: str, out: Path, outtype: str, base_out: Path | None,
                 ollama: bool) -> None:
    try:
        import gguf  # noqa: F401  (llama.cpp's writer: checked before the model loads)
    except ImportError:
        raise ConfigError(f"--format {format} needs llama.cpp's gguf package: pip install 'lorakit[gguf]'") from None
    from ..deploy.archs import notes
    from ..deploy.gguf import check_exportable, export_model_gguf
    from ..deploy.gguf_lora import check_separable, export_lora_gguf
    from ..serving.generation import use_chat_template
    from ..training.trained import load_trained

    net, tokenizer, task, _ = load_trained(model, adapter, precision="fp32")
    if not task.generates:
        raise ConfigError(f"{adapter} is a {task.name} adapter; GGUF export takes causal language models")
    use_chat_template(tokenizer, adapter)  # the template the run was trained with, if it was on conversations
    check_exportable(net, tokenizer, outtype)
    for line in notes(net.config):
        typer.echo(line)
    if format == "gguf":
        arch = export_model_gguf(net, tokenizer, out, outtype)
        typer.echo(f"GGUF written to {out} ({arch}, {outtype}, adapter merged, {_mib(out)}); "
                   f"run it with: llama-cli -m {out}")
    else:
        check_separable(net)
        arch = export_lora_gguf(net, out, outtype)
        typer.echo(f"GGUF LoRA written to {out} ({arch}, {outtype}, {_mib(out)})")
        if base_out is not None:
            export_model_gguf(net, tokenizer, base_out, outtype, merged=False)
            typer.echo(f"base model GGUF written to {base_out} ({outtype}, {_mib(base_out)}); run both with: "
                       f"llama-cli -m {base_out} --lora {out}")
    if ollama:
        from ..deploy.ollama import write_modelfile

        typer.echo(write_modelfile(out.parent / "Modelfile", base_out or out, out if base_out else None, tokenizer))


def _mib(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"
