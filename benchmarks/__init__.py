"""lorakit's benchmark suite: lorakit LoRA against PEFT LoRA, full fine-tuning and the base model.

Run everything with `python -m benchmarks.run` (see BENCHMARKS.md for the options and the latest numbers).
"""
