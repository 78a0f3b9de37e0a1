"""MkDocs hook: the API reference names objects by their public names (``::: sparkme.SparseEncoder``); this hook
points mkdocstrings at the module that defines each one today.

sparkme's public API is imported lazily (``sparkme.__getattr__``) and its modules are being reorganised, so a
static path such as ``sparkme.models.encoder.SparseEncoder`` would break whenever a class moves. Each ``::: name``
line is resolved by importing ``name`` and reading the object's ``__module__`` and ``__qualname__``; a public name
that no longer imports fails the build (``mkdocs build --strict``) with the page and the name.
"""

from __future__ import annotations

import importlib
import inspect
import re

from mkdocs.exceptions import PluginError

DIRECTIVE = re.compile(r"^(:::\s+)(sparkme(?:\.\w+)*)\s*$", re.MULTILINE)


def resolve(name: str) -> str:
    """The defining ``module.qualname`` of the public object ``name`` (a module resolves to itself)."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and module_name.startswith(error.name):
                continue  # the name is an attribute path below a shorter module path
            raise
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        break
    else:
        raise ImportError(f"no module of {name!r} imports")
    if inspect.ismodule(obj):
        return obj.__name__
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}.{qualname}" if module and qualname else name


def on_page_markdown(markdown: str, page, **_) -> str:
    def replace(match: re.Match) -> str:
        try:
            return match.group(1) + resolve(match.group(2))
        except (ImportError, AttributeError) as error:
            raise PluginError(f"{page.file.src_path}: the API name {match.group(2)!r} does not import: "
                              f"{error}") from error

    return DIRECTIVE.sub(replace, markdown)
