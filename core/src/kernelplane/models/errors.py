class ModelLoadError(RuntimeError):
    """A model file or folder is missing, corrupt or unsupported; the message names it."""
