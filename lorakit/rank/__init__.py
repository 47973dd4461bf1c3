"""Intrinsic rank as a tool (the LoRA paper's §7 measured on your own adapters):

    analyze   singular values, effective rank, norm; with a base model the relative norm and amplification factor
              (beside a random-matrix baseline); with a second adapter the subspace similarity φ   (analyze.py)
    extract   a full fine-tune as a LoRA adapter: truncated SVD of W_tuned − W_base, shard by shard   (extract.py)
    resize    an adapter re-factored to a lower rank, a fixed r or by kept energy                   (resize.py)
    combine   adapter arithmetic as PEFT's add_weighted_adapter: linear, cat, svd, ties, dare        (combine.py)

The quantities live in spectra.py, reading and writing adapter directories in adapters.py, the table and plot in
report.py; the four commands are in cli/rank.py. Every output is an ordinary PEFT-layout adapter directory.
May import: lorakit.training and every wing below it.
"""

from .analyze import analyze
from .combine import combine
from .extract import extract
from .resize import resize

__all__ = ["analyze", "extract", "resize", "combine"]
