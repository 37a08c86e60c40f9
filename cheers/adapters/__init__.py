"""Weight adapters: other checkpoint layouts <-> ours, one module per layout.

    official        the released Cheers folder (``official.py``)
    hf_qwen         ``transformers`` Qwen2 / Qwen2.5 / Qwen3 folders (``hf_qwen.py``)
    siglip          ``transformers`` SigLIP / SigLIP2 vision folders (``siglip.py``)
    diffusers_vae   ``diffusers`` VAE folders, and the official VAE layout (``diffusers_vae.py``)

One naming scheme: ``config_from_<layout>(data, *, source)`` and ``config_to_<layout>(cfg)`` for
configs, ``<layout>_to_ours(state, ...)`` and ``ours_to_<layout>(state, ...)`` for tensor names
(values untouched, so each pair round-trips exactly). Every state dict reaches a module through
``cheers.safetensors_io.load_checked``, which checks every name and shape first.
"""
