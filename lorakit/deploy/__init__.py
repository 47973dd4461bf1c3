"""Deploying a trained run where users serve models: `lorakit export`.

- gguf.py: the merged model (an NF4 base dequantized first) as one GGUF file for llama.cpp and Ollama, written with
  llama.cpp's own `gguf` package, tensor by tensor; archs.py says which architectures that covers and how their
  Hugging Face tensors are named and laid out in GGUF; vocab.py puts the tokenizer and chat template in it.
- gguf_lora.py: the adapter alone as a GGUF LoRA (llama.cpp's `--lora`), in the layout of llama.cpp's
  convert_lora_to_gguf.py, to apply on the base model's GGUF (written too with --base-output).
- ollama.py: a Modelfile beside the GGUF (FROM, ADAPTER, TEMPLATE and stop tokens for recognised chat templates).
- vllm.py: what vLLM's LoRA loader accepts, checked, and the adapter written for it.
The `lorakit export` command is cli/export.py. May import: lorakit.training and every wing below it.
"""
