"""Adapters on a whole model: the config (config), finding parts by type (parts), injecting and removing (inject),
the PEFT file format alone (files) and putting an adapter read from files onto a model (attach), merging
(merging), QLoRA (qlora), mixed-adapter batches (routing), the optimizer's groups (optim), one lock per model
(locks). May import: lorakit.nn, lorakit.errors."""
