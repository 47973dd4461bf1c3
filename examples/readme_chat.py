"""README's chat example, run as README writes it: the `chats.jsonl` and the commands of its "Chat models" section,
on a local 2-layer Llama with random weights (README's `--model` is a hub model; this machine has no internet),
with their output put in README's text block.

    python -m examples.readme_chat            # print the output block
    python -m examples.readme_chat --write    # and replace README's block with it
    python -m examples.readme_chat --check    # exit 1 when README's block is not what the commands print

The commands run as a user runs them (`python -m lorakit ...` in a fresh process), with `--model` replaced and
LORAKIT_CPU_BF16=0, so that `--precision auto` is fp32 on every CPU and the output is the same on any machine up to
float rounding (--check compares the losses within LOSS_TOLERANCE, every other character exactly).
tests/test_readme.py runs --check.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- readme_chat: output -->", "<!-- /readme_chat -->"
KEPT = ("training data:", "eval loss before", "best eval loss")  # the training lines README shows, "..." between
TYPED = ["Can I merge the adapter?", "Does that slow inference?", "/exit"]  # what the user types at the chat prompt
LOSS_TOLERANCE = 0.02
NUMBER = re.compile(r"\d+\.\d+")


def readme_section(readme: str) -> tuple[str, list[str]]:
    """README's chats.jsonl and its commands (lorakit lines, continuations joined), from the Chat models section."""
    section = readme[readme.index("## Chat models"):]
    block = section[section.index("```bash\n") + 8:section.index("\n```", section.index("```bash\n"))]
    data = block[block.index("<<'EOF'\n") + 8:block.index("\nEOF\n")] + "\n"
    lines = block[block.index("\nEOF\n") + 5:].replace("\\\n", " ").splitlines()
    return data, [line for line in lines if line.startswith("lorakit ")]


def tiny_chat_model(path: Path, data: str) -> None:
    """A 2-layer Llama with random weights and a byte-level BPE tokenizer learned on the chats, ChatML template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils.logging import disable_progress_bar

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>", "<s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([data], trainer)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", bos_token="<s>", pad_token="</s>",
                                        extra_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=template)
    tokenizer.save_pretrained(path)
    disable_progress_bar()
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)


def run_commands(commands: list[str], work: Path, model: Path) -> str:
    """Each command's output as README shows it: training's kept lines, `$ command` and the output of the others,
    the chat as a terminal shows it (each typed line after its prompt)."""
    env = {**os.environ, "LORAKIT_CPU_BF16": "0", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(README.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    shown = []
    for command in commands:
        args = shlex.split(command)
        if "--model" in args:  # README's hub model, replaced by the local tiny one
            args[args.index("--model") + 1] = str(model)
        chat = args[1] == "chat"
        done = subprocess.run([sys.executable, "-m", "lorakit", *args[1:]], cwd=work, env=env, text=True,
                              capture_output=True, input="\n".join(TYPED) + "\n" if chat else None, timeout=900)
        if done.returncode:
            raise SystemExit(f"{command} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        if args[1] == "train":
            kept = [line for line in done.stdout.splitlines() if line.startswith(KEPT)]
            shown.append("\n".join(kept[:1] + ["..."] + kept[1:]))
        else:
            shown.append(f"$ {command}\n" + (_terminal(done.stdout) if chat else done.stdout.rstrip()))
    return "\n\n".join(shown)


def _terminal(output: str) -> str:
    # Piped input is not echoed: put each typed line after its prompt, as a terminal shows them.
    pieces = output.split("you> ")
    return "".join(piece + f"you> {typed}\n" for piece, typed in zip(pieces, TYPED)).rstrip()


def readme_block(readme: str) -> str:
    """The output block README shows now (between the markers, without the fence)."""
    inner = readme[readme.index(BEGIN) + len(BEGIN):readme.index(END)]
    return inner.strip().removeprefix("```text").removesuffix("```").strip()


def same_output(shown: str, printed: str) -> bool:
    """Equal text, the losses within LOSS_TOLERANCE (float rounding differs between CPUs)."""
    if NUMBER.sub("#", shown) != NUMBER.sub("#", printed):
        return False
    return all(abs(float(a) - float(b)) <= LOSS_TOLERANCE * max(1.0, abs(float(b)))
               for a, b in zip(NUMBER.findall(shown), NUMBER.findall(printed)))


def generate_block() -> str:
    """Run README's chat commands on the tiny model in a scratch directory; their output block."""
    data, commands = readme_section(README.read_text())
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        (work / "chats.jsonl").write_text(data)
        tiny_chat_model(work / "tiny-chat-llama", data)
        return run_commands(commands, work, work / "tiny-chat-llama")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="replace README's output block")
    p.add_argument("--check", action="store_true", help="exit 1 when README's block differs")
    args = p.parse_args(argv)
    printed = generate_block()
    print(printed)
    readme = README.read_text()
    if args.write:
        block = f"{BEGIN}\n```text\n{printed}\n```\n{END}"
        start, end = readme.index(BEGIN), readme.index(END) + len(END)
        README.write_text(readme[:start] + block + readme[end:])
    if args.check and not same_output(readme_block(readme), printed):
        print("README's chat output differs from what the commands print: python -m examples.readme_chat --write",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
