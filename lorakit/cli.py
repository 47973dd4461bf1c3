"""The `lorakit` command line: train, eval, predict, chat, merge, info, serve; analyze, extract, resize and combine
live in lorakit/rank/cli.py."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Optional

import typer

from .data import DataError, check_columns, collator, label_names, load_labels, read_table, split_columns, texts
from .dataset import examples, other_columns
from .generate import Sampling, generate, use_chat_template
from .generate import stream as generate_stream
from .evaluation import evaluate as evaluate_model
from .fit import Interrupted, TrainingError
from .models import load_trained
from .prepare import no_progress_bars, prepare
from .rundir import LABELS_FILE, METRICS_FILE, write_json
from .settings import ConfigError, TrainConfig, command_line_config
from .train import train as run_training

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LoRA fine-tuning of Hugging Face models. Run `lorakit train` with no options for a short demo.")


@contextlib.contextmanager
def user_errors():
    """Turn the library's user-facing errors into a clean message and a non-zero exit, with no traceback."""
    try:
        yield
    except Interrupted as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(130)
    except (ConfigError, DataError, TrainingError, FileNotFoundError, ValueError) as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of settings (keys as the flags below, "
                                          "dashes or underscores); flags given on the command line win."),
    model: Optional[str] = typer.Option(None, help="Hugging Face model id or local directory "
                                        "(default: the packaged sentence-transformers/all-MiniLM-L6-v2)"),
    task: Optional[str] = typer.Option(None, help="classify | causal-lm (default: classify)"),
    data: Optional[str] = typer.Option(None, help="Training data: .csv, .tsv, .jsonl or .parquet file, or a Hugging "
                                       "Face dataset name (name or name:split). None: the shipped news demo."),
    eval_data: Optional[str] = typer.Option(None, help="Evaluation data, same formats."),
    text_column: Optional[str] = typer.Option(None, help="Text column(s), comma-separated, joined with a space "
                                              "(default: text)"),
    eval_text_column: Optional[str] = typer.Option(None, help="Text column(s) of the eval data if they differ."),
    label_column: Optional[str] = typer.Option(None, help="Label column: integer ids or names (default: label)"),
    prompt_column: Optional[str] = typer.Option(None, help="causal-lm: prompt column; the loss then covers only "
                                                "the text column (the completion)."),
    r: Optional[int] = typer.Option(None, "--r", help="LoRA rank (default: 8)"),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha; scale = alpha / r (default: 16)"),
    dropout: Optional[float] = typer.Option(None, help="Dropout on the LoRA branch (default: 0.05)"),
    targets: Optional[str] = typer.Option(None, help="Modules to adapt, comma-separated names or suffixes, or "
                                          "all-linear (default: per architecture, e.g. query,value for BERT)"),
    rslora: bool = typer.Option(False, "--rslora", help="rsLoRA: scale alpha/sqrt(r) instead of alpha/r."),
    dora: bool = typer.Option(False, "--dora", help="DoRA: weight-decomposed LoRA (trainable magnitude per output)."),
    quantize: Optional[str] = typer.Option(None, help="nf4: QLoRA, every frozen Linear of the base in 4-bit "
                                           "NormalFloat, quantized while the checkpoint loads (default: none)"),
    dtype: Optional[str] = typer.Option(None, help="The base's weights: auto (the checkpoint's own) | bf16 | fp16 | "
                                        "fp32 (default: auto)"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute activations in "
                                                "backward: far less memory, about a third more compute."),
    epochs: Optional[float] = typer.Option(None, help="Passes over the training data (default: 3)"),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps; wins over --epochs."),
    batch_size: Optional[int] = typer.Option(None, help="Examples per step per process (default: 16)"),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step (default: 1)"),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: 1e-3)"),
    warmup: Optional[float] = typer.Option(None, help="Warm-up: a fraction of the steps if < 1, else a number of "
                                           "steps (default: 0.06)"),
    scheduler: Optional[str] = typer.Option(None, help="linear | cosine | constant (default: linear)"),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay (default: 0)"),
    lr_ratio: Optional[float] = typer.Option(None, help="LoRA+: B learns lr_ratio times faster than A (default: 1; "
                                             "the paper uses 16)"),
    max_grad_norm: Optional[float] = typer.Option(None, help="Gradient clipping norm, 0 for none (default: 1)"),
    max_length: Optional[int] = typer.Option(None, help="Tokens per example, longer ones truncated (default: 128)"),
    seed: Optional[int] = typer.Option(None, help="Random seed (default: 0)"),
    eval_every: Optional[int] = typer.Option(None, help="Evaluate every N steps (default: 5 times per run)"),
    save_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps (default: 100)"),
    log_every: Optional[int] = typer.Option(None, help="Write log.jsonl every N steps (default: 5)"),
    output: Optional[str] = typer.Option(None, help="Run directory (default: a new runs/<timestamp>)"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in --output."),
    precision: Optional[str] = typer.Option(None, help="Compute: auto (bf16 where the device multiplies bf16 fast, "
                                            "else fp32) | fp32 | bf16 (autocast) (default: auto)"),
    chat_template: Optional[str] = typer.Option(None, help="causal-lm: a Jinja chat template file for conversation "
                                                "data, for a tokenizer without one (or to replace its own); saved "
                                                "with the adapter for predict and chat."),
    num_proc: Optional[int] = typer.Option(None, help="causal-lm: processes that tokenise the data (the result is "
                                           "cached between runs either way)"),
    overlong: Optional[str] = typer.Option(None, help="causal-lm: rows longer than --max-length are truncate(d) "
                                           "or drop(ped) (default: truncate)"),
    packing: bool = typer.Option(False, "--packing", help="causal-lm: pack examples into rows of --max-length "
                                 "tokens (positions restart and attention stays inside each example)."),
    report_to: Optional[str] = typer.Option(None, help="none | tensorboard | wandb: also send the log there "
                                            "(default: none)"),
    keep_best: bool = typer.Option(False, "--keep-best", help="The final adapter is the checkpoint with the best eval "
                                   "metric (accuracy, or loss for causal-lm); needs --eval-data."),
    early_stopping: Optional[int] = typer.Option(None, help="Stop after N evaluations without a better eval metric."),
    save_total_limit: Optional[int] = typer.Option(None, help="Keep the newest K checkpoints (and the best), also "
                                                   "after the run (default: only the newest, removed at the end)"),
    sharding: Optional[str] = typer.Option(None, help="fsdp: shard the model across torchrun's processes (FSDP2: "
                                           "each holds 1/N of the frozen weights); none: DDP (default: none)"),
):
    """Fine-tune a model with LoRA. With no --data: a short demo on shipped news headlines with MiniLM."""
    flags = {k: v for k, v in locals().items() if k != "config" and v is not None and v is not False}
    flags = {{"rslora": "use_rslora", "dora": "use_dora"}.get(k, k): v for k, v in flags.items()}
    with user_errors():
        cfg = command_line_config(flags, config)
        if cfg.data is None and not cfg.resume:
            typer.echo("No --data: demo run, fine-tuning all-MiniLM-L6-v2 on lorakit's shipped news headlines.")
        run_training(cfg, echo=typer.echo)


@app.command("eval")
def evaluate(
    data: str = typer.Option(..., help="Evaluation data file (or Hugging Face dataset name)."),
    model: Optional[str] = typer.Option(None, help="Base model or merged export (default: the adapter's base model)"),
    adapter: Optional[str] = typer.Option(None, help="Adapter directory (a run directory of lorakit train). "
                                          "None: the model as it is."),
    task: Optional[str] = typer.Option(None, help="classify | causal-lm (default: from the adapter or model)"),
    text_column: str = typer.Option("text", help="Text column(s), comma-separated."),
    label_column: str = typer.Option("label", help="Label column (classify)."),
    prompt_column: Optional[str] = typer.Option(None, help="Prompt column (causal-lm: loss on the completion only)."),
    max_length: int = typer.Option(128, help="Tokens per example."),
    batch_size: int = typer.Option(32, help="Examples per forward pass."),
    precision: str = typer.Option("auto", help="auto | fp32 | bf16 (as lorakit train)"),
    dtype: str = typer.Option("auto", help="The base's weights: auto (the checkpoint's own) | bf16 | fp16 | fp32"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Accuracy and macro-F1 (classify) or loss and perplexity (causal-lm) of a model, with or without an adapter."""
    with user_errors():
        df = read_table(data)
        cols = split_columns(text_column)
        net, tokenizer, task, labels = load_trained(model, adapter, task, _data_labels(df, label_column, task), dtype,
                                                    precision)
        if task == "causal-lm":  # conversations (in the adapter's chat template) or prompt/text, as training reads them
            use_chat_template(tokenizer, adapter)
            with no_progress_bars():  # a tokenising bar in front of the metrics is noise
                rows = prepare(df, tokenizer, max_length, text_columns=cols, prompt_column=prompt_column,
                               name=data).dataset
        else:
            cfg = TrainConfig(task=task, label_column=label_column, max_length=max_length)
            check_columns(df, cols + other_columns(cfg), data)
            rows = examples(df, cols, cfg, tokenizer, labels, data)
        result = evaluate_model(net, rows, collator(tokenizer, task), task, batch_size, precision)
        result["examples"] = len(rows)
        if as_json:
            typer.echo(json.dumps(result))
        else:
            for key, value in result.items():
                typer.echo(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


def _data_labels(df, label_column: str, task: str | None) -> list[str] | None:
    # Labels for a model that has none saved (the base model): the eval data's own, sorted.
    if task == "causal-lm" or label_column not in df.columns:
        return None
    return label_names(df[label_column], "data")


@app.command()
def predict(
    text: Optional[list[str]] = typer.Argument(None, help="Text(s) to classify, or prompts to continue."),
    model: Optional[str] = typer.Option(None, help="Base model or merged export (default: the adapter's base model)"),
    adapter: Optional[str] = typer.Option(None, help="Adapter directory."),
    data: Optional[str] = typer.Option(None, help="A file of texts instead of arguments."),
    text_column: str = typer.Option("text", help="Text column(s) of --data."),
    task: Optional[str] = typer.Option(None, help="classify | causal-lm (default: from the adapter or model)"),
    max_length: int = typer.Option(128, help="Tokens per input (classify)."),
    max_new_tokens: int = typer.Option(40, help="Tokens to generate (causal-lm)."),
    batch_size: int = typer.Option(8, help="Prompts generated together (causal-lm)."),
    temperature: float = typer.Option(0.0, help="Sampling temperature (causal-lm); 0: greedy."),
    top_p: float = typer.Option(1.0, help="Sample from the likeliest tokens holding this much probability."),
    seed: Optional[int] = typer.Option(None, help="Seed of the sampling: the same seed, the same text."),
    stream: bool = typer.Option(False, "--stream", help="Print the generated text as it comes (causal-lm)."),
    chat_template: Optional[str] = typer.Option(None, help="A Jinja chat template file to put the prompts in "
                                                "(default: the adapter's, if it was trained on conversations)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per line."),
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
        if task == "causal-lm":
            chat = use_chat_template(tokenizer, adapter, chat_template)
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


@app.command()
def chat(
    adapter: Optional[str] = typer.Option(None, help="Adapter directory (a run of lorakit train on conversations)."),
    model: Optional[str] = typer.Option(None, help="Base model (default: the adapter's base model)"),
    system: Optional[str] = typer.Option(None, help="A system prompt, kept at the start of the conversation."),
    max_new_tokens: int = typer.Option(256, help="Most tokens of one answer."),
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0: greedy."),
    top_p: float = typer.Option(1.0, help="Sample from the likeliest tokens holding this much probability."),
    seed: Optional[int] = typer.Option(None, help="Seed of the sampling."),
    chat_template: Optional[str] = typer.Option(None, help="A Jinja chat template file (default: the adapter's, "
                                                "else the tokenizer's own)."),
):
    """Chat with a causal-LM adapter in the terminal; the conversation is kept and answers stream as they come.
    At the prompt: /reset starts over, /history prints the conversation, /exit (or Ctrl-D) leaves."""
    from .chat import chat_loop

    with user_errors():
        if adapter is None and model is None:
            raise ConfigError("give --adapter DIR (or --model M to chat with a base model)")
        sampling = Sampling(max_new_tokens, temperature, top_p, seed)
        net, tokenizer, task, _ = load_trained(model, adapter, None if adapter else "causal-lm")
        if task != "causal-lm":
            raise ConfigError(f"{adapter} is a {task} adapter; lorakit chat needs a causal-lm one")
        if not use_chat_template(tokenizer, adapter, chat_template) and not tokenizer.chat_template:
            raise ConfigError("no chat template: the adapter was not trained on conversations and the tokenizer has "
                              "none; pass --chat-template FILE")
        typer.echo("chat: /reset starts over, /history shows the conversation, /exit or Ctrl-D leaves")
        chat_loop(net, tokenizer, sampling, system=system)


@app.command()
def merge(
    adapter: str = typer.Option(..., help="Adapter directory."),
    output: str = typer.Option(..., help="Directory for the merged model (Hugging Face format)."),
    model: Optional[str] = typer.Option(None, help="Base model (default: the adapter's base model)"),
    task: Optional[str] = typer.Option(None, help="classify | causal-lm (default: from the adapter)"),
    dtype: str = typer.Option("auto", help="Dtype of the merged weights: auto (the base checkpoint's) | bf16 | fp16 | "
                              "fp32"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output if it exists."),
):
    """Fold the adapter into the base weights and save a plain Hugging Face model (loads with from_pretrained), shard
    by shard: a QLoRA run's base is dequantized one layer at a time, never held in full precision."""
    from .export import checkpoint_dtype, export_merged, save_merged_config
    from .files import atomic_directory
    from .precision import DTYPES, NAMES, storage_dtype

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
        typer.echo(f"merged model written to {out} ({task}, {NAMES.get(target, 'each tensor in its own dtype')}); "
                   f"load it with transformers' from_pretrained")


@app.command()
def info(
    directory: str = typer.Argument(..., help="Adapter or run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Rank, alpha, targets, trainable parameters, file size, base model, task and labels of an adapter."""
    from safetensors import safe_open

    from .files import WEIGHTS_NAME, read_adapter_config

    with user_errors():
        cfg = read_adapter_config(directory)
        weights = Path(directory) / WEIGHTS_NAME
        with safe_open(weights, framework="pt") as f:
            params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        result = {"r": cfg.r, "alpha": cfg.alpha, "targets": cfg.targets, "modules_to_save": cfg.modules_to_save,
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


@app.command()
def serve(
    model: Optional[str] = typer.Option(None, help="Base model (default: the first adapter's base model)"),
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", help="NAME=DIR, repeatable: adapters loaded at "
                                                "start and never evicted (a run directory or an adapter directory)"),
    adapter_dir: Optional[str] = typer.Option(None, help="Adapters loaded by name on first use, the least recently "
                                              "used evicted; nothing outside this directory is read."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    task: Optional[str] = typer.Option(None, help="classify | causal-lm (default: from the adapters or model)"),
    max_wait_ms: float = typer.Option(5.0, help="How long a batch waits for more requests."),
    max_batch_tokens: int = typer.Option(8192, help="Padded tokens in one batch (and the most one request may use)."),
    max_texts: int = typer.Option(64, help="Texts in one classify request."),
    max_length: int = typer.Option(128, help="Tokens per text (longer ones truncated, as predict does)."),
    max_new_tokens: int = typer.Option(256, help="Most tokens one generate request may ask for."),
    adapter_memory_mb: float = typer.Option(1024.0, help="Memory budget of the loaded adapters, MiB."),
    no_batching: bool = typer.Option(False, "--no-batching", help="One request at a time with set_adapter "
                                     "(the baseline the serving benchmark compares with)."),
):
    """Serve one base model with many adapters over HTTP; concurrent requests share mixed-adapter batches."""
    with user_errors():
        try:
            from .adapter_cache import Settings
            from .serve import run
        except ImportError as e:
            raise ConfigError(f"lorakit serve needs FastAPI and uvicorn: pip install 'lorakit[serve]' ({e})") from None
        pinned = {}
        for item in adapter or []:
            name, sep, directory = item.partition("=")
            if not sep or not name or not directory:
                raise ConfigError(f"--adapter {item!r}: expected NAME=DIR")
            pinned[name] = directory
        settings = Settings(model=model, adapters=pinned, adapter_dir=adapter_dir, task=task, max_wait_ms=max_wait_ms,
                            max_batch_tokens=max_batch_tokens, max_texts=max_texts, max_length=max_length,
                            max_new_tokens=max_new_tokens, adapter_memory_mb=adapter_memory_mb,
                            batching=not no_batching)
        run(settings, host, port)


from .rank.cli import register as register_rank_commands  # noqa: E402  (analyze, extract, resize, combine)

register_rank_commands(app)
