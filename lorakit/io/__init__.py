"""Models in and out of files: loading a base model and its tokenizer from the hub or a directory (models),
quantizing while loading shard by shard (checkpoints), writing a merged model shard by shard (export).
May import: lorakit.runtime, lorakit.adapters, lorakit.nn, lorakit.data, lorakit.errors."""
