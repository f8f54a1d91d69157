from .adapters import Adapter, find_adapter
from .loading import load_model, resolve_device

__all__ = ["Adapter", "find_adapter", "load_model", "resolve_device"]
