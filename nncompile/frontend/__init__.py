"""Frontends -> IR ``Graph``: `.nn` source (``parse``, ``parse_text``; dsl.py) and torch modules
(``from_torch`` through torch.export, ``from_fx`` through symbolic tracing; fx.py).

``from_torch``/``from_fx`` are imported on first use, so reading `.nn` files does not load torch.
"""
from nncompile.frontend.dsl import parse, parse_text

__all__ = ["from_fx", "from_torch", "parse", "parse_text"]


def __getattr__(name: str):
    if name in ("from_torch", "from_fx"):
        from nncompile.frontend.fx import from_fx, from_torch

        return {"from_torch": from_torch, "from_fx": from_fx}[name]
    raise AttributeError(f"module 'nncompile.frontend' has no attribute '{name}'")
