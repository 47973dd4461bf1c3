"""A training run: its settings (settings), the task records (tasks), the run's data (dataset), the loop (fit),
evaluation (evaluation), the run directory and checkpoints (rundir), tracking (tracking), and `train()`, which
orchestrates them (train). May import every wing below it: io, runtime, data, adapters, nn, errors."""
