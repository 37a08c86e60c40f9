"""Training: ``python -m cheers.train --config configs/X.yaml [dotted.overrides]`` (also under torchrun).

Modules: ``config`` (RunConfig = model + TrainConfig + DataConfig), ``data`` (WebDataset
streams of RawSample), ``task`` (what model and collate to build), ``parallelize`` (FSDP2,
activation checkpointing, compile), ``optim`` (trainable selection, AdamW, schedules),
``ema``, ``checkpoint`` (sharded save / resume / export) and ``trainer`` (the loop).
"""
