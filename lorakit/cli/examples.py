"""The examples that end each command's --help: two or three command lines per command, in one table."""

from __future__ import annotations

EXAMPLES = {
    "train": [
        "lorakit train --model bert-base-uncased --data news.csv --eval-data dev.csv --text-column title,description",
        "lorakit train --model gpt2 --task causal-lm --data qa.jsonl --prompt-column prompt --text-column completion",
        "lorakit train --config run.yaml --lr 5e-4 --no-packing",
        "lorakit train --task causal-lm --data chats.jsonl --data qa.jsonl --data-weights 0.7,0.3 --eval-split 0.05",
    ],
    "eval": ["lorakit eval --adapter runs/news --data dev.csv --json",
             "lorakit eval --model gpt2 --task causal-lm --data held-out.jsonl   # the base model, no adapter"],
    "predict": ['lorakit predict --adapter runs/news "Stocks rally as the central bank holds rates"',
                'lorakit predict --adapter runs/chat --stream "Can I merge the adapter?"',
                'lorakit predict --adapter runs/chat --temperature 0.7 --top-p 0.9 --seed 1 --json "hello" "hi"'],
    "chat": ["lorakit chat --adapter runs/chat",
             'lorakit chat --adapter runs/chat --system "You answer in one sentence." --max-new-tokens 128'],
    "merge": ["lorakit merge --adapter runs/news --output merged/",
              "lorakit merge --adapter runs/qlora --output merged/ --dtype bf16   # a QLoRA base, dequantized"],
    "info": ["lorakit info runs/news", "lorakit info runs/news --json"],
    "serve": ["lorakit serve --adapter news=runs/news --adapter sentiment=runs/sst2",
              "lorakit serve --model gpt2 --adapter-dir runs/ --api-key $KEY --allow-adapter-management"],
    "export": ["lorakit export --adapter runs/chat --format gguf --output chat.gguf --outtype q8_0 --ollama",
               "lorakit export --adapter runs/chat --format gguf-lora --output chat-lora.gguf --base-output base.gguf",
               "lorakit export --adapter runs/chat --format vllm --output vllm/chat"],
    "analyze": ["lorakit analyze runs/news",
                "lorakit analyze runs/news --base bert-base-uncased --json",
                "lorakit analyze runs/r8 --compare runs/r64 --plot phi.png"],
    "extract": ["lorakit extract --base bert-base-uncased --tuned my-full-finetune --r 16 --output adapters/extracted",
                "lorakit extract --base gpt2 --tuned my-gpt2 --energy 0.9 --output adapters/gpt2"],
    "resize": ["lorakit resize runs/r64 --r 8 --output runs/r8",
               "lorakit resize runs/r64 --energy 0.99 --output runs/smaller"],
    "combine": ["lorakit combine runs/a runs/b --weights 0.7,0.3 --output runs/mix",
                "lorakit combine runs/a runs/b --weights 1,1 --method ties --density 0.5 --output runs/ties"],
}


def help_examples(command: str) -> str:
    """The --help epilog of `command`: its examples, a blank line between them (rich keeps them as lines)."""
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in EXAMPLES[command]) + "\n"
