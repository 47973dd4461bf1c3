"""Training data before it meets a model's run: tables and labels (tables), conversations and chat templates
(conversations), tokenizing through `datasets` (prepare), packing several examples per row (packing), several
sources mixed and held out (sources), streamed sources (streams).
May import: lorakit.errors only."""
