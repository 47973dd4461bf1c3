"""A training run: its settings (settings), the task records (tasks), the run's data (dataset), the loop (fit),
the chunked causal-LM loss (chunked_loss), evaluation (evaluation), the run directory and checkpoints (rundir),
tracking (tracking), stopping on Ctrl-C or SIGTERM (stops), a finished run loaded for use (trained), preference
tuning (preference/), and `train()`, which orchestrates them (train). May import every wing below it: io, runtime,
data, adapters, nn, errors."""
