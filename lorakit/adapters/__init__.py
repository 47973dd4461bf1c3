"""Adapters on a whole model: the config (config), finding parts by type (parts), injecting, loading into and
removing (inject, files), merging (merging), QLoRA (qlora), mixed-adapter batches (routing), the optimizer's groups
(optim), one lock per model (locks). files is the PEFT file format alone; attach puts an adapter read from files onto a model.
May import: lorakit.nn, lorakit.errors."""
