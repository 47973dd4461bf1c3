"""Where and how a model runs: processes (distributed), compute and storage dtypes (precision), FSDP2 sharding and
gathering (sharding). May import: lorakit.adapters, lorakit.nn, lorakit.errors."""
