"""Which base-model layers an adapter config selects, decided as PEFT 0.21.2 decides it, and the
checks that the config and the uploaded file agree. Shared by every kind parser.

PEFT creates an adapter layer only for a module that ``check_target_module_exists`` accepts
(``peft/tuners/tuners_utils.py``), in this order:

1. ``exclude_modules``: a regex string is ``re.fullmatch``-ed against the module path; a list
   excludes a path equal to an entry or ending in ``"." + entry``.
2. ``target_modules`` a string: ``re.fullmatch(target_modules, path)`` (``"all-linear"``, compared
   lower-cased, is first expanded to every linear layer except the output layer: on our base models
   that is exactly ``BaseModelSpec.layers``).
3. ``target_modules`` a list (PEFT turns it into a set): a path equal to an entry is selected as is;
   a path ending in ``"." + entry`` is selected if ``layers_to_transform`` (int or non-empty list) is
   unused or contains the path's layer index, read with ``layers_pattern`` (PEFT's regexes below).
4. ``target_modules`` missing or null: PEFT falls back to its per-architecture default list; we do
   not re-implement that table and accept the file's layers (steps 1 and 3's layer filter still apply).

Rules on top of that, because an upload that breaks them cannot be what its author meant:

* every ``target_modules`` list entry names a layer this server can adapt (``UnsupportedAdapter``
  otherwise: "lm_head", "embed_tokens", ...) and, unless exclude_modules / layers_to_transform leave
  it nothing to select, selects at least one layer the file has tensors for;
* every layer in the file is selected (PEFT would not create it, so serving it would differ from PEFT);
* ``layers_to_transform`` names layers that exist; ``layers_pattern`` is a string or list of strings
  and matches the base model; the combinations PEFT's configs refuse are refused.

Config regexes are untrusted: they are accepted only when Python's ``re`` provably cannot backtrack
much on our module paths (see :func:`compile_safe_regex`).
"""

from __future__ import annotations

import re
import re._parser as _sre  # the stdlib's own regex parser (3.11+): the AST ``re`` will execute
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .errors import InvalidAdapter, UnsupportedAdapter
from .types import BaseModelSpec

ALL_LINEAR = "all-linear"  # PEFT's INCLUDE_LINEAR_LAYERS_SHORTHAND
# PEFT's layer-index regexes: the first numbered segment (lazy .*?), or the one after a layers_pattern.
_DEFAULT_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")
_PATTERN_INDEX = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."

_MAX_REGEX_LEN = 256
# Upper bound on the ways a regex can match one module path (see _ways). Measured on 560 paths of 32
# characters (an 80-layer model): a 1e6 bound (".*.*.*.*x" is 1.2e6) costs <0.1 s for all of them,
# while unbounded regexes like "(.*.*.*)(.*.*.*)x" (1e9) take 10 s. Real target_modules regexes are far
# below it: ".*\.(q_proj|v_proj)" is 66, ".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$" 1.4e5.
_MAX_REGEX_WAYS = 10**6
# Regex AST nodes that consume one character or nothing, with no choice to backtrack over.
_ATOMS = {"LITERAL", "NOT_LITERAL", "ANY", "IN", "AT", "CATEGORY", "RANGE", "NEGATE"}


class _Unsafe(Exception):
    pass


def _has_choice(items: Any) -> bool:
    for op, av in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "BRANCH"):
            return True
        if name == "SUBPATTERN" and _has_choice(av[-1]):
            return True
    return False


def _ways(items: Any, subject_len: int) -> int:
    """Upper bound on the match attempts of a parsed regex against one string of ``subject_len``
    characters: a sequence multiplies, a branch adds, a quantifier over a choice-free body multiplies
    by the repeat counts it can try. A quantifier over a body that has choices itself (``(a+)+``,
    ``(a|ab)*``: the exponential cases) and non-regular constructs (backreferences, lookarounds,
    conditionals, atomic groups) are refused outright."""
    total = 1
    for op, av in items:
        name = str(op)
        if name in _ATOMS:
            continue
        if name == "SUBPATTERN":
            total *= _ways(av[-1], subject_len)
        elif name == "BRANCH":
            total *= sum(_ways(b, subject_len) for b in av[1])
        elif name in ("MAX_REPEAT", "MIN_REPEAT"):
            lo, hi, body = av
            if _has_choice(body):
                raise _Unsafe(
                    "it puts a quantifier on a group that itself has a quantifier or '|', which can "
                    "backtrack exponentially"
                )
            total *= max(1, min(hi, subject_len) - lo + 1)
        else:
            raise _Unsafe(
                f"it uses {name} (backreferences, lookarounds, conditionals, atomic groups and "
                "possessive quantifiers are not accepted)"
            )
    return total


def compile_safe_regex(what: str, pattern: str, base: BaseModelSpec) -> re.Pattern[str]:
    """Compile an untrusted regex that will be matched against the base model's module paths."""
    if len(pattern) > _MAX_REGEX_LEN:
        raise UnsupportedAdapter(
            f"{what} {pattern[:40]!r}... is {len(pattern)} characters long, the limit is {_MAX_REGEX_LEN}"
        )
    try:
        compiled = re.compile(pattern)
        tree = _sre.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise InvalidAdapter(f"{what} {pattern!r} is not a valid regex: {exc}") from exc
    subject_len = max((len(p) for p in base.layers), default=0) + 1
    try:
        ways = _ways(tree, subject_len)
    except _Unsafe as exc:
        raise UnsupportedAdapter(f"{what} {pattern!r} is not supported: {exc}") from exc
    if ways > _MAX_REGEX_WAYS:
        raise UnsupportedAdapter(
            f"{what} {pattern!r} is not supported: it may try ~{float(ways):.1e} ways to match "
            f"one module path (limit {_MAX_REGEX_WAYS:.0e}); use fewer '*', '+', '{{m,n}}'"
        )
    return compiled


def _str_list(cfg: dict[str, Any], key: str) -> list[str] | str | None:
    """A field PEFT types as Optional[Union[list[str], str]]: None, a string, or a list of strings."""
    v = cfg.get(key)
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return v
    raise InvalidAdapter(f"config field {key!r} must be a string, a list of strings or null, got {v!r}")


def _layer_indexes(cfg: dict[str, Any]) -> frozenset[int] | None:
    """``layers_to_transform`` (int or list of ints); None when PEFT does not use it (null or [])."""
    v = cfg.get("layers_to_transform")
    ints = v if isinstance(v, list) else [v]
    if v is None or v == []:
        return None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ints):
        raise InvalidAdapter(f"config field 'layers_to_transform' must be an integer or a list of integers, got {v!r}")
    return frozenset(ints)


def _dot_suffixes(path: str) -> list[str]:
    """Every ``t`` with ``path.endswith("." + t)``: the parts after each dot. PEFT's list matching is
    ``path == t or path.endswith("." + t)``, i.e. ``t`` in ``[path] + _dot_suffixes(path)``; a set
    lookup per suffix keeps it O(path depth) instead of O(len(target_modules)) per path."""
    parts = path.split(".")
    return [".".join(parts[i:]) for i in range(1, len(parts))]


def _name_match(names: frozenset[str], path: str) -> bool:
    return path in names or not names.isdisjoint(_dot_suffixes(path))


@dataclass(frozen=True, slots=True)
class Targets:
    """The selection an adapter config makes over ``base.layers`` (see the module docstring)."""

    modules: frozenset[str] | None  # target_modules list entries; None: regex, all-linear or missing
    regex: re.Pattern[str] | None  # target_modules as a regex (not all-linear)
    all_linear: bool
    missing: bool  # target_modules missing / null: PEFT's default table, not re-implemented
    exclude: frozenset[str] | re.Pattern[str] | None
    layers: frozenset[int] | None  # layers_to_transform, None = not used
    layer_patterns: tuple[re.Pattern[str], ...]  # compiled layers_pattern regexes; () = PEFT's default
    raw: Any  # target_modules as uploaded, for messages

    # ------------------------------------------------------------------ PEFT's decision, per path
    def layer_index(self, path: str) -> int | None:
        if not self.layer_patterns:
            m = _DEFAULT_INDEX.match(path)
        else:
            m = None
            for pattern in self.layer_patterns:
                m = pattern.match(path)
                if m is not None:
                    break
        return None if m is None else int(m.group("idx"))

    def excluded(self, path: str) -> bool:
        if self.exclude is None:
            return False
        if isinstance(self.exclude, re.Pattern):
            return self.exclude.fullmatch(path) is not None
        return _name_match(self.exclude, path)

    def _layer_ok(self, path: str) -> bool:
        return self.layers is None or self.layer_index(path) in self.layers

    def _entries_selecting(self, paths: Iterable[str]) -> set[str]:
        """The target_modules list entries that make PEFT adapt at least one of ``paths``."""
        assert self.modules is not None
        out: set[str] = set()
        for path in paths:
            if self.excluded(path):
                continue
            if path in self.modules:  # an exact path, whatever layers_to_transform says
                out.add(path)
            if self._layer_ok(path):
                out.update(self.modules.intersection(_dot_suffixes(path)))
        return out

    def selects(self, path: str) -> bool:
        """PEFT's ``check_target_module_exists`` for a path of ``base.layers``."""
        if self.excluded(path):
            return False
        if self.all_linear:
            return True
        if self.regex is not None:
            return self.regex.fullmatch(path) is not None
        if self.modules is None:  # missing: PEFT's default short names, still filtered by layer index
            return self._layer_ok(path)
        if path in self.modules:  # an exact path bypasses layers_to_transform in PEFT
            return True
        return _name_match(self.modules, path) and self._layer_ok(path)

    def config_layers(self, base: BaseModelSpec) -> set[str] | None:
        """Layers of ``base`` PEFT adapts for this config; None when target_modules is missing."""
        if self.missing:
            return None
        return {p for p in base.layers if self.selects(p)}

    # ------------------------------------------------------------------ file vs config
    def check_file(self, paths: Iterable[str], base: BaseModelSpec) -> None:
        """Every layer of the file is selected, and every target_modules entry selects a file layer.

        An empty file passes: the kind parser refuses it with its own message."""
        paths = sorted(paths)
        if not paths:
            return
        for path in paths:
            if self.selects(path):
                continue
            if self.excluded(path):
                why = f"config exclude_modules {_show(self.exclude)} excludes it"
            elif self.regex is not None:
                why = f"config target_modules regex {self.raw!r} does not fullmatch it"
            elif self.modules is not None and not _name_match(self.modules, path):
                why = f"config target_modules {_show(self.modules)} does not select it"
            else:
                index, chosen = self.layer_index(path), sorted(self.layers or ())
                why = f"its layer index {index} is not in layers_to_transform {chosen}"
            raise InvalidAdapter(
                f"module {path!r} has tensors in adapter_model.safetensors but {why}, so PEFT would "
                "not create that layer"
            )
        if self.modules is None:
            return
        in_base = self._entries_selecting(base.layers)
        in_file = self._entries_selecting(paths)
        # An entry that exclude_modules / layers_to_transform leave with nothing to select is a no-op,
        # not a contradiction: PEFT itself saves all-linear + exclude_modules that way.
        for entry in sorted(in_base - in_file):
            have = ", ".join(sorted({p.rsplit(".", 1)[-1] for p in paths}))
            raise InvalidAdapter(
                f"config target_modules entry {entry!r} selects no layer that "
                f"adapter_model.safetensors has tensors for (it has: {have})"
            )


def _show(v: Any) -> str:
    return repr(v.pattern) if isinstance(v, re.Pattern) else repr(sorted(v))


def parse_targets(cfg: dict[str, Any], base: BaseModelSpec) -> Targets:
    """Validate target_modules / exclude_modules / layers_to_transform / layers_pattern against ``base``."""
    tm = cfg.get("target_modules")
    well_typed = tm is None or isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))
    if not well_typed:
        raise InvalidAdapter(
            f"config field 'target_modules' must be a list of module names, a regex string or null, got {tm!r}"
        )
    layers = _layer_indexes(cfg)
    lp = _str_list(cfg, "layers_pattern")
    # PEFT: null, "" and [] mean "its default index regex"; the entries of a non-empty list are all used.
    lp_list = ([lp] if lp else []) if isinstance(lp, str) else (lp or [])
    if isinstance(tm, str):
        for key, used in (("layers_to_transform", layers is not None), ("layers_pattern", bool(lp_list))):
            if used:
                raise InvalidAdapter(
                    f"config field {key!r}={cfg[key]!r} cannot be combined with target_modules "
                    f"{tm!r} (a string): PEFT rejects or ignores it there"
                )
    if lp_list and cfg.get("layers_to_transform") is None:
        raise InvalidAdapter(f"config field 'layers_pattern'={lp!r} needs layers_to_transform (PEFT rejects it alone)")

    ex = _str_list(cfg, "exclude_modules")
    exclude = (
        compile_safe_regex("config exclude_modules", ex, base) if isinstance(ex, str) else frozenset(ex) if ex else None
    )
    patterns = tuple(compile_safe_regex("config layers_pattern", _PATTERN_INDEX.format(p), base) for p in lp_list)
    all_linear = isinstance(tm, str) and tm.lower() == ALL_LINEAR
    regex = compile_safe_regex("config target_modules", tm, base) if isinstance(tm, str) and not all_linear else None
    if isinstance(tm, list):
        if not tm:
            raise InvalidAdapter("config field 'target_modules' is an empty list: PEFT would adapt nothing")
        names = {n for p in base.layers for n in (p, *_dot_suffixes(p))}
        for entry in tm:
            if entry not in names:
                adaptable = ", ".join(sorted({p.rsplit(".", 1)[-1] for p in base.layers}))
                raise UnsupportedAdapter(
                    f"config target_modules entry {entry!r} is not a layer this server can "
                    f"adapt (adaptable: {adaptable}, or their full module paths)"
                )
    targets = Targets(
        modules=frozenset(tm) if isinstance(tm, list) else None,
        regex=regex,
        all_linear=all_linear,
        missing=tm is None,
        exclude=exclude,
        layers=layers,
        layer_patterns=patterns,
        raw=tm,
    )
    if layers is not None:
        existing = {i for i in map(targets.layer_index, base.layers) if i is not None}
        if not existing:
            raise InvalidAdapter(f"config field 'layers_pattern'={lp!r} matches no layer of the base model")
        unknown = sorted(layers - existing)
        if unknown:
            raise InvalidAdapter(
                f"config field 'layers_to_transform' names layers {unknown} that the base model does "
                f"not have (it has layers {min(existing)}..{max(existing)})"
            )
    return targets
