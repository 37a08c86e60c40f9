"""Exceptions raised on bad input. Each message names the file, key, shape or value at fault."""


class CheersError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(CheersError, ValueError):
    """A config file or override is wrong: unknown key, wrong type, bad value."""


class CheckpointError(CheersError, ValueError):
    """A checkpoint folder or tensor file is missing, corrupt or does not fit the model."""


class InputError(CheersError, ValueError):
    """A user input (image, prompt, sequence, size) cannot be used."""
