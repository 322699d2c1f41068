"""PEFT methods, registered by name in :data:`strato_peft.registry.METHODS`."""

from strato_peft.methods.base import Method, MethodError, get_method, method_class, run_folder

__all__ = ["Method", "MethodError", "get_method", "method_class", "run_folder"]
