"""Where and how a model runs: processes (distributed), compute and storage dtypes (precision), FSDP2 sharding and
gathering, and the process-aware save_adapter (sharding), freed memory returned to the system (heap), torch.compile of
the transformer blocks (compiling: --compile) and Liger Kernel's fused kernels on CUDA (kernels: --kernels).
May import: lorakit.adapters, lorakit.nn, lorakit.errors."""
