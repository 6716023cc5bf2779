"""PEP 562 lazy attributes for package ``__init__`` files, so entry scripts do not import kornia,
lpips, open_clip or clean-fid until a name from them is used."""

from __future__ import annotations

from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str]):
    """``(__getattr__, __dir__, __all__)`` serving ``name`` from ``package.<exports[name]>`` on first use."""
    names = sorted(exports)

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f".{exports[name]}", package), name)

    def __dir__():
        return names

    return __getattr__, __dir__, names
