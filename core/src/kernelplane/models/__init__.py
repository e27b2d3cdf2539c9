"""Model loading (the embedded SmolLM2 GGUF, GGUF files, Hugging Face folders) and the Llama-family model."""
from .config import ModelConfig
from .errors import ModelLoadError
from .loader import LoadedModel, load_model, load_model_config, resolve_model_path
from .tokenizer import ChatTemplateError, Tokenizer

__all__ = ["ChatTemplateError", "LoadedModel", "ModelConfig", "ModelLoadError", "Tokenizer", "load_model",
           "load_model_config", "resolve_model_path"]
