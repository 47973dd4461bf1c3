"""The LoRA layer itself: the NF4 codec and its frozen Linear (nf4), the fused LoRA matmul (fused), one record per
base layer type (kinds), LoRA and DoRA as records with every path of theirs (variants), and LoraLayer (layers);
autocast's compute dtype, asked in one place (autocasting).
May import: torch, lorakit.errors. Nothing here knows about models, files or training."""
