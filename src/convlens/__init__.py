"""convlens: explain and interpret convolutional image classifiers written in PyTorch.

Example:
    >>> import convlens as cl
    >>> model = cl.load_model()
    >>> e = cl.explain(model, cl.sample_images()["chelsea"], method="guided_backprop")
    >>> e.overlay().save("guided.png")
"""

# _command_line first: it sets the ``convlens`` command's OpenMP default before torch loads;
# importing convlens.methods registers the built-in methods (their @register decorators)
from convlens import _command_line, audit, datasets, features, methods, metrics, targets  # noqa: F401
from convlens.api import explain
from convlens.explanation import Explanation
from convlens.images import load_image, sample_images
from convlens.model import Model, wrap
from convlens.registry import get_method, list_methods, register
from convlens.zoo import load_model

__version__ = "0.1.0"

__all__ = [
    "Explanation",
    "Model",
    "audit",
    "datasets",
    "explain",
    "features",
    "get_method",
    "list_methods",
    "load_image",
    "load_model",
    "methods",
    "metrics",
    "register",
    "sample_images",
    "targets",
    "wrap",
]
