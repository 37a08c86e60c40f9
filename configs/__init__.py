"""Training recipes (the YAML files beside this one), installed as ``cheers.configs`` so a wheel
carries them; ``cheers.config.recipe_path`` finds one by name or path."""
