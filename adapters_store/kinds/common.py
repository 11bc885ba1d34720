"""Small helpers shared by the kind parsers."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import InvalidAdapter, UnsupportedAdapter
from ..types import BaseModelSpec, TargetLayer


def base_layer(base: BaseModelSpec, path: str) -> TargetLayer:
    layer = base.layers.get(path)
    if layer is None:
        raise InvalidAdapter(f"module {path!r} does not exist in the base model (or is not adaptable)")
    return layer


def check_rank(base: BaseModelSpec, path: str, r: int) -> None:
    if r > base.max_rank:
        raise UnsupportedAdapter(f"module {path!r} has rank {r}, the server's max_rank is {base.max_rank}")


def short_names(paths: Iterable[str]) -> list[str]:
    return sorted({p.rsplit(".", 1)[-1] for p in paths})
