"""An Ollama Modelfile beside an exported GGUF: FROM the model file, ADAPTER the LoRA file when it is separate, and
for a chat template it recognises, Ollama's TEMPLATE (Go template syntax) and the stop token ending a turn.

Jinja chat templates cannot be translated to Go templates in general. A template is recognised by what it renders,
not by its text: a probe conversation is rendered with it and compared with what each known format renders; the
Modelfile then carries that format's Ollama template. Otherwise it says so, and Ollama falls back on what it makes
of the GGUF's own tokenizer.chat_template.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..adapters.files import atomic_write

PROBE = [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]


@dataclass(frozen=True)
class ChatFormat:
    """A chat format Ollama can run: what it renders for messages (Python), its Ollama template, its stop tokens."""

    name: str
    render: Callable[[list[dict], str], str]  # (messages, bos_token) -> prompt with the assistant's turn opened
    template: str
    stops: tuple[str, ...]


def _chatml(messages: list[dict], bos: str) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def _llama3(messages: list[dict], bos: str) -> str:
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages)
    return bos + turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"


FORMATS = (
    ChatFormat("ChatML", _chatml,
               "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n", ("<|im_end|>",)),
    ChatFormat("Llama 3", _llama3,
               "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n", ("<|eot_id|>",)),
)


def recognise(tokenizer) -> ChatFormat | None:
    """The known chat format the tokenizer's chat template renders (with and without a system prompt), or None."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None
    bos = tokenizer.bos_token or ""
    for fmt in FORMATS:
        if all(_renders(tokenizer, probe) == fmt.render(probe, bos) for probe in (PROBE, PROBE[1:])):
            return fmt
    return None


def _renders(tokenizer, messages: list[dict]) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses the probe (say, no system role) is simply not recognised
        return None


def write_modelfile(path: Path, model_file: Path, adapter_file: Path | None, tokenizer) -> str:
    """Write the Modelfile at `path` (paths relative to its folder); returns a line saying what it holds."""
    fmt = recognise(tokenizer)
    lines = [f"FROM {_relative(model_file, path.parent)}"]
    if adapter_file is not None:
        lines.append(f"ADAPTER {_relative(adapter_file, path.parent)}")
    if fmt is not None:
        lines.append(f'TEMPLATE """{fmt.template}"""')
        lines += [f'PARAMETER stop "{stop}"' for stop in fmt.stops]
        said = f"Ollama Modelfile written to {path} ({fmt.name} chat template, stop {', '.join(fmt.stops)})"
    elif getattr(tokenizer, "chat_template", None):
        said = (f"Ollama Modelfile written to {path}; its chat template is not one lorakit can translate to "
                f"Ollama's (ChatML, Llama 3): no TEMPLATE line, so Ollama uses what it makes of the GGUF's own "
                f"chat template; add TEMPLATE and PARAMETER stop lines by hand if answers do not stop")
    else:
        said = f"Ollama Modelfile written to {path}; the tokenizer has no chat template: plain completion only"
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return said


def _relative(file: Path, folder: Path) -> str:
    try:
        return "./" + str(file.resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(file.resolve())
