"""The `lorakit` command line: train, eval, predict, chat, merge, info, serve, export, and analyze, extract, resize
and combine (cli/rank.py)."""

from __future__ import annotations

import inspect
import json
import logging
import math
from pathlib import Path
from typing import Optional

import typer

from ..data.prepare import no_progress_bars, prepare
from ..data.tables import (
    check_columns,
    label_names,
    load_labels,
    read_table,
    split_columns,
    texts,
)
from ..errors import ConfigError
from ..io.models import positions, within_positions
from ..serving.cache import Settings as ServeSettings
from ..serving.generation import Sampling, generate, prompt_tokens, use_chat_template
from ..serving.generation import stream as generate_stream
from ..training.dataset import examples, other_columns
from ..training.evaluation import evaluate as evaluate_model
from ..training.rundir import LABELS_FILE, METRICS_FILE, write_json
from ..training.settings import TrainConfig, command_line_config
from ..training.tasks import TASKS, task_named
from ..training.train import train as run_training
from ..training.trained import load_trained
from .chat import chat
from .examples import help_examples
from .feedback import user_errors
from .options import field_parameters, pairs, switch, train_parameters, with_flags

TASK_NAMES = " | ".join(TASKS)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LoRA fine-tuning of Hugging Face models. Run `lorakit train` with no options for a short demo.")


# Libraries whose log records are noise on lorakit's normal output (bitsandbytes, imported by PEFT when transformers
# builds a scheduler, warns on every run that it cannot fetch an optional kernel); --verbose lets them through.
THIRD_PARTY_LOGGERS = ("bitsandbytes", "transformers", "datasets", "huggingface_hub", "torch.distributed")


@app.callback()
def main(verbose: bool = switch("--verbose", help="Also show the log messages of the libraries "
                                "lorakit uses (transformers, bitsandbytes, ...).")):
    """LoRA fine-tuning of Hugging Face models."""
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)


@app.command(epilog=help_examples("train"))
@with_flags(train_parameters())
def train(flags: dict):
    """Fine-tune a model with LoRA. With no --data: a short demo on shipped news headlines with MiniLM."""
    with user_errors():
        config = flags.pop("config", None)
        cfg = command_line_config(flags, config)
        if cfg.data is None and not cfg.resume:
            typer.echo("No --data: demo run, fine-tuning all-MiniLM-L6-v2 on lorakit's shipped news headlines.")
        run_training(cfg, echo=typer.echo)


@app.command("eval", epilog=help_examples("eval"))
def evaluate(
    data: str = typer.Option(..., help="Evaluation data file (or Hugging Face dataset name)."),
    model: Optional[str] = typer.Option(None, help="Base model or merged export (default: the adapter's base model)"),
    adapter: Optional[str] = typer.Option(None, help="Adapter directory (a run directory of lorakit train). "
                                          "None: the model as it is."),
    task: Optional[str] = typer.Option(None, help=f"{TASK_NAMES} (default: from the adapter or model)"),
    text_column: str = typer.Option("text", help="Text column(s), comma-separated."),
    label_column: str = typer.Option("label", help="Label column (classify)."),
    prompt_column: Optional[str] = typer.Option(None, help="Prompt column (causal-lm: loss on the completion only)."),
    max_length: int = typer.Option(128, help="Tokens per example."),
    batch_size: int = typer.Option(32, help="Examples per forward pass."),
    precision: str = typer.Option("auto", help="auto | fp32 | bf16 (as lorakit train)"),
    dtype: str = typer.Option("auto", help="The base's weights: auto (the checkpoint's own) | bf16 | fp16 | fp32"),
    as_json: bool = switch("--json", help="Print one JSON object."),
):
    """Accuracy and macro-F1 (classify) or loss and perplexity (causal-lm) of a model, with or without an adapter."""
    with user_errors():
        df = read_table(data)
        cols = split_columns(text_column)
        net, tokenizer, task, labels = load_trained(model, adapter, task, _data_labels(df, label_column, task), dtype,
                                                    precision)
        max_length = within_positions(max_length, net, lambda line: typer.echo(line, err=True))
        if task.generates:  # conversations (in the adapter's chat template) or prompt/text, as training reads them
            use_chat_template(tokenizer, adapter)
            with no_progress_bars():  # a tokenising bar in front of the metrics is noise
                rows = prepare(df, tokenizer, max_length, text_columns=cols, prompt_column=prompt_column,
                               name=data).dataset
        else:
            cfg = TrainConfig(task=task.name, label_column=label_column, max_length=max_length)
            check_columns(df, cols + other_columns(cfg), data)
            rows = examples(df, cols, cfg, tokenizer, labels, data)
        result = evaluate_model(net, rows, task.collator(tokenizer), task, batch_size, precision)
        result["examples"] = len(rows)
        if as_json:
            typer.echo(json.dumps(result))
        else:
            for key, value in result.items():
                typer.echo(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


def _prompt_room(net, max_new_tokens: int) -> int | None:
    """The tokens a prompt may have beside --max-new-tokens in the model's positions (None: its config does not
    say); an error when the answer alone fills them."""
    most = positions(net)
    if most is not None and max_new_tokens >= most:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: the model has {most} positions, prompt included")
    return None if most is None else most - max_new_tokens


def _data_labels(df, label_column: str, task: str | None) -> list[str] | None:
    # Labels for a model that has none saved (the base model): the eval data's own, sorted.
    if (task and not task_named(task).labelled) or label_column not in df.columns:
        return None
    return label_names(df[label_column], "data")


@app.command(epilog=help_examples("predict"))
def predict(
    text: Optional[list[str]] = typer.Argument(None, help="Text(s) to classify, or prompts to continue."),
    model: Optional[str] = typer.Option(None, help="Base model or merged export (default: the adapter's base model)"),
    adapter: Optional[str] = typer.Option(None, help="Adapter directory."),
    data: Optional[str] = typer.Option(None, help="A file of texts instead of arguments."),
    text_column: str = typer.Option("text", help="Text column(s) of --data."),
    task: Optional[str] = typer.Option(None, help=f"{TASK_NAMES} (default: from the adapter or model)"),
    max_length: int = typer.Option(128, help="Tokens per input (classify)."),
    max_new_tokens: int = typer.Option(40, help="Tokens to generate (causal-lm)."),
    batch_size: int = typer.Option(8, help="Prompts generated together (causal-lm)."),
    temperature: float = typer.Option(0.0, help="Sampling temperature (causal-lm); 0: greedy."),
    top_p: float = typer.Option(1.0, help="Sample from the likeliest tokens holding this much probability."),
    seed: Optional[int] = typer.Option(None, help="Seed of the sampling: the same seed, the same text."),
    stream: bool = switch("--stream", help="Print the generated text as it comes (causal-lm)."),
    chat_template: Optional[str] = typer.Option(None, help="A Jinja chat template file to put the prompts in "
                                                "(default: the adapter's, if it was trained on conversations)."),
    as_json: bool = switch("--json", help="Print one JSON object per line."),
):
    """Labels with probabilities (classify) or generations (causal-lm: batched, greedy or sampled, each prompt in
    the chat template if the adapter was trained on conversations, stopping at the end of the assistant's turn)."""
    import torch

    with user_errors():
        items = list(text or [])
        if data:
            df = read_table(data)
            check_columns(df, split_columns(text_column), data)
            items += texts(df, split_columns(text_column))
        if not items:
            raise ConfigError("nothing to predict: give texts as arguments or --data FILE")
        if stream and as_json:
            raise ConfigError("--stream prints text as it comes; --json prints whole results: use one of them")
        sampling = Sampling(max_new_tokens, temperature, top_p, seed)
        net, tokenizer, task, labels = load_trained(model, adapter, task)
        max_length = within_positions(max_length, net, lambda line: typer.echo(line, err=True))
        if task.generates:
            room = _prompt_room(net, max_new_tokens)
            chat = use_chat_template(tokenizer, adapter, chat_template)
            _check_prompts(tokenizer, items, chat, room, max_new_tokens)
            _generate_all(net, tokenizer, items, sampling, chat, batch_size, stream, as_json)
            return
        for item in items:
            with torch.no_grad():
                result, line = _classify(net, tokenizer, labels, item, max_length)
            typer.echo(json.dumps(result) if as_json else line)


def _classify(net, tokenizer, labels: list[str], item: str, max_length: int) -> tuple[dict, str]:
    # (JSON result, text line): every label with its probability, the likeliest first.
    enc = tokenizer(item, truncation=True, max_length=max_length, return_tensors="pt").to(net.device)
    probs = net(**enc).logits.float().softmax(-1)[0].tolist()
    ranked = sorted(zip(labels, probs), key=lambda lp: -lp[1])
    line = f"{ranked[0][0]}\t" + "  ".join(f"{n} {p:.3f}" for n, p in ranked) + f"\t{item}"
    return {"text": item, "label": ranked[0][0], "probabilities": dict(ranked)}, line


def _check_prompts(tokenizer, items: list[str], chat: bool, room: int | None, max_new_tokens: int) -> None:
    # Every prompt fits beside the answer before any is generated (one too long fails inside the model).
    if room is None:  # the model's config names no positions
        return
    for number, item in enumerate(items, 1):
        tokens = prompt_tokens(tokenizer, item, chat)
        if tokens > room:
            raise ConfigError(f"prompt {number} has {tokens} tokens{' in the chat template' if chat else ''}; with "
                              f"--max-new-tokens {max_new_tokens} the model's {room + max_new_tokens} positions "
                              f"leave room for {room}")


def _generate_all(net, tokenizer, items: list[str], sampling: Sampling, chat: bool, batch_size: int, stream: bool,
                  as_json: bool) -> None:
    # Plain prompts print as prompt + continuation, chat prompts as the answer alone; --json pairs them.
    def show(piece: str) -> None:
        typer.echo(piece, nl=False)

    if stream:
        for item in items:
            show("" if chat else item)
            generate_stream(net, tokenizer, item, sampling, show, chat=chat)
            typer.echo("")
        return
    for item, generated in zip(items, generate(net, tokenizer, items, sampling, chat=chat, batch_size=batch_size)):
        typer.echo(json.dumps({"text": item, "generation": generated}) if as_json else
                   generated if chat else f"{item}{generated}")


@app.command(epilog=help_examples("merge"))
def merge(
    adapter: str = typer.Option(..., help="Adapter directory."),
    output: str = typer.Option(..., help="Directory for the merged model (Hugging Face format)."),
    model: Optional[str] = typer.Option(None, help="Base model (default: the adapter's base model)"),
    task: Optional[str] = typer.Option(None, help=f"{TASK_NAMES} (default: from the adapter)"),
    dtype: str = typer.Option("auto", help="Dtype of the merged weights: auto (the base checkpoint's) | bf16 | fp16 | "
                              "fp32"),
    overwrite: bool = switch("--overwrite", help="Replace --output if it exists."),
):
    """Fold the adapter into the base weights and save a plain Hugging Face model (loads with from_pretrained), shard
    by shard: a QLoRA run's base is dequantized one layer at a time, never held in full precision."""
    from ..adapters.files import atomic_directory
    from ..io.export import checkpoint_dtype, export_merged, save_merged_config
    from ..runtime.precision import DTYPES, NAMES, storage_dtype

    with user_errors():
        out = Path(output)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--output {out} is a file, not a directory")
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise ConfigError(f"--output {out} is not empty; pass --overwrite to replace it")
        storage_dtype(dtype, "cpu")  # an unknown --dtype is refused before the model loads
        net, tokenizer, task, labels = load_trained(model, adapter, task, precision="fp32")
        target = DTYPES[dtype] or checkpoint_dtype(net.config)
        out.parent.mkdir(parents=True, exist_ok=True)

        def fill(tmp: Path) -> None:
            export_merged(net, tmp, target)
            save_merged_config(net, tmp, target)
            tokenizer.save_pretrained(tmp)
            if labels:
                write_json(tmp / LABELS_FILE, labels)

        atomic_directory(out, fill)
        typer.echo(f"merged model written to {out} ({task.name}, {NAMES.get(target, 'each tensor in its own dtype')}); "
                   f"load it with transformers' from_pretrained")


@app.command(epilog=help_examples("info"))
def info(
    directory: str = typer.Argument(..., help="Adapter or run directory."),
    as_json: bool = switch("--json", help="Print one JSON object."),
):
    """Rank, alpha, targets, variant (LoRA or DoRA), lora_bias, scale (rsLoRA or not), quantization, trainable parameters,
    file size, base model, task and labels of an adapter."""
    from safetensors import safe_open

    from ..adapters.files import WEIGHTS_NAME, read_adapter_config

    with user_errors():
        cfg = read_adapter_config(directory)
        weights = Path(directory) / WEIGHTS_NAME
        with safe_open(weights, framework="pt") as f:
            params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        result = {"r": cfg.r, "alpha": cfg.alpha, "targets": cfg.targets, "modules_to_save": cfg.modules_to_save,
                  "variant": "DoRA" if cfg.use_dora else "LoRA", "lora_bias": cfg.lora_bias, "scale": _scale(cfg), "quantize": cfg.quantize,
                  "trainable_params": params, "file_bytes": weights.stat().st_size,
                  "base_model": cfg.base_model_name_or_path, "task": cfg.task_type, "labels": load_labels(directory)}
        metrics = Path(directory) / METRICS_FILE
        if metrics.is_file():
            m = json.loads(metrics.read_text())
            result.update({key: m.get(key) for key in ("total_params", "eval", "device", "compute_dtype", "weights")})
        if as_json:
            typer.echo(json.dumps(result))
            return
        for key, value in result.items():
            if value is not None:
                typer.echo(f"{key + ':':<18}{_human(key, value)}")


def _scale(cfg) -> str:
    # How ΔW is scaled: rsLoRA's alpha/sqrt(r) or LoRA's alpha/r, and where modules differ (rank or alpha pattern).
    rule = "alpha/sqrt(r) (rsLoRA)" if cfg.use_rslora else "alpha/r"
    return rule + (", per module where rank_pattern or alpha_pattern says" if cfg.rank_pattern or cfg.alpha_pattern
                   else "")


def _human(key: str, value) -> str:
    if key == "file_bytes":
        return f"{value:,} bytes ({value / 1024:.1f} KiB)"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)




def serve_parameters() -> list[inspect.Parameter]:
    """Every serving.cache.Settings flag, then where to listen."""
    where = [("host", str, "127.0.0.1", "Address to listen on."), ("port", int, 8000, "Port to listen on.")]
    return field_parameters(ServeSettings) + [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                          default=typer.Option(default, help=text, rich_help_panel="Listening"))
        for name, kind, default, text in where]


@app.command(epilog=help_examples("serve"))
@with_flags(serve_parameters())
def serve(flags: dict):
    """Serve one base model with many adapters over HTTP; concurrent requests share mixed-adapter batches."""
    with user_errors():
        try:
            from ..serving.app import run
        except ImportError as e:  # FastAPI and uvicorn are an extra
            raise ConfigError(f"lorakit serve needs FastAPI and uvicorn: pip install 'lorakit[serve]' ({e})") from None
        host, port = flags.pop("host"), flags.pop("port")
        flags["adapters"] = pairs(flags.get("adapters", []), "--adapter")
        run(ServeSettings(**flags), host, port)


app.command(epilog=help_examples("chat"))(chat)

from .export import export  # noqa: E402  (lorakit export: GGUF for llama.cpp and Ollama, vLLM; the work is in deploy/)

app.command(epilog=help_examples("export"))(export)

from .rank import register as register_rank_commands  # noqa: E402  (analyze, extract, resize, combine)

register_rank_commands(app)
