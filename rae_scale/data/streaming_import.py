"""Import mosaicml-streaming without its ready-made dataset classes.

``import streaming`` runs its ``__init__``, which imports the subpackages ``text``, ``vision`` and
``multimodal`` (C4, ImageNet, WebVid, ...). ``text`` imports transformers' AutoTokenizer and with
it torch._dynamo: about 3 s in every process that reads or writes MDS (each training rank, each
prepare worker, each evaluation), for classes rae_scale never uses. ``import_streaming`` puts those
three subpackages in ``sys.modules`` as empty modules that run their own code the first time one of
their names is looked up, so code that does use them still works, just later.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

_DATASET_ZOO = ("text", "vision", "multimodal")


class _LoadsOnFirstUse(types.ModuleType):
    """A package whose own __init__ runs at the first lookup of a name it does not have yet.

    Not importlib's LazyLoader: that one loads on *any* attribute read, and the import system reads
    ``__spec__`` of a module already in sys.modules, so it would load at once.
    """

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        self.__class__ = types.ModuleType  # from here on an ordinary module
        self.__spec__.loader.exec_module(self)
        return getattr(self, name)


def import_streaming() -> types.ModuleType:
    """The ``streaming`` package, imported with its dataset classes deferred (see the module docstring)."""
    if "streaming" not in sys.modules:
        spec = importlib.util.find_spec("streaming")  # a top-level find: imports nothing
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("mosaicml-streaming is not installed; pip install mosaicml-streaming")
        for sub in _DATASET_ZOO:
            name = f"streaming.{sub}"
            sub_spec = importlib.machinery.PathFinder.find_spec(name, list(spec.submodule_search_locations))
            if name in sys.modules or sub_spec is None or sub_spec.loader is None:
                continue
            module = _LoadsOnFirstUse(name)
            module.__spec__, module.__loader__ = sub_spec, sub_spec.loader
            module.__file__, module.__path__ = sub_spec.origin, list(sub_spec.submodule_search_locations or [])
            module.__package__ = name
            sys.modules[name] = module
    import streaming

    return streaming
