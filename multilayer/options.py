"""Typed options: read from a URL query or from keyword arguments, validated in one place."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .exceptions import ConfigurationError

__all__ = ["Option", "resolve_options"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class Option:
    """One option a layer or a backend accepts.

    ``kind`` is ``int``, ``float``, ``bool``, ``str`` or ``object`` (keyword argument only,
    checked by ``check``). ``minimum`` bounds numbers; ``choices`` bounds strings; ``check``
    receives the typed value and returns an error text, or None when the value is fine.
    ``secret`` values are never echoed in errors. ``convert`` (for ``object`` options that
    may also come from the URL as text) returns the canonical value or raises
    :class:`~multilayer.exceptions.ConfigurationError` itself.

    ``schemes`` names the only URL schemes the option applies to: set to anything but its
    default under another scheme, it is refused. ``alias_of`` names the option this one is
    an older spelling of: its value (after ``convert``) is given to that option, and the
    alias itself never reaches the backend.
    """

    kind: type
    default: Any
    help: str
    minimum: float | None = None
    choices: tuple[str, ...] | None = None
    in_url: bool = True
    secret: bool = False
    check: Callable[[Any], str | None] | None = None
    convert: Callable[[Any], Any] | None = None
    schemes: tuple[str, ...] | None = None
    alias_of: str | None = None

    def from_text(self, name: str, text: str) -> Any:
        """Convert a URL query value to this option's type."""
        if not self.in_url:
            raise ConfigurationError(
                f"option {name!r} cannot be set in the URL; pass it as a keyword argument"
            )
        shown = "***" if self.secret else repr(text)
        value: Any = text
        try:
            if self.kind is bool:
                lowered = text.strip().lower()
                if lowered not in _TRUE | _FALSE:
                    raise ValueError(text)
                value = lowered in _TRUE
            elif self.kind is int:
                value = int(text)
            elif self.kind is float:
                value = float(text)
        except ValueError:
            raise ConfigurationError(
                f"option {name!r} must be {_kind_name(self.kind)}, not {shown}"
            ) from None
        return self.validate(name, value)

    def validate(self, name: str, value: Any) -> Any:
        """Check a typed value (from a keyword argument or converted from the URL)."""
        shown = "***" if self.secret else repr(value)
        if value is None and self.default is None:
            return None
        kind_ok = (
            isinstance(value, bool)
            if self.kind is bool
            else isinstance(value, int) and not isinstance(value, bool)
            if self.kind is int
            else isinstance(value, (int, float)) and not isinstance(value, bool)
            if self.kind is float
            else isinstance(value, self.kind)
        )
        if kind_ok and self.kind is float and not math.isfinite(value):
            raise ConfigurationError(f"option {name!r} must be a finite number, not {shown}")
        if not kind_ok:
            raise ConfigurationError(
                f"option {name!r} must be {_kind_name(self.kind)}, not {shown} "
                f"({type(value).__name__})"
            )
        if self.minimum is not None and value < self.minimum:
            raise ConfigurationError(f"option {name!r} must be >= {self.minimum:g}, not {shown}")
        if self.choices is not None and value not in self.choices:
            raise ConfigurationError(
                f"option {name!r} must be one of {', '.join(self.choices)}; not {shown}"
            )
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise ConfigurationError(f"option {name!r}: {problem}")
        if self.convert is not None:
            return self.convert(value)
        return float(value) if self.kind is float else value


def resolve_options(
    specs: Mapping[str, Option],
    query: Mapping[str, str],
    overrides: Mapping[str, Any],
    *,
    where: str,
    scheme: str | None = None,
) -> dict[str, Any]:
    """Merge defaults, URL query values and keyword overrides (in that order of precedence).

    An unknown name is an error that lists the valid ones; ``where`` (the sanitized URL)
    tells the user which layer the error is about. With ``scheme``, an option set away
    from its default under a scheme it does not apply to is an error. Aliases are folded
    into the options they spell: the result holds no alias.
    """
    for name in (*query, *overrides):
        if name not in specs:
            raise ConfigurationError(
                f"unknown option {name!r} for {where}; valid options: {', '.join(sorted(specs))}"
            )
    values = {name: spec.default for name, spec in specs.items() if spec.alias_of is None}
    given: dict[str, str] = {}  # option -> the name (itself or an alias) that set it
    for source in (
        {name: specs[name].from_text(name, text) for name, text in query.items()},
        {name: specs[name].validate(name, value) for name, value in overrides.items()},
    ):
        spelled: dict[str, str] = {}
        for name, value in source.items():
            target = specs[name].alias_of or name
            if target in spelled:
                raise ConfigurationError(
                    f"{where}: options {spelled[target]!r} and {name!r} set the same thing; "
                    "give one"
                )
            spelled[target] = given[target] = name
            values[target] = value
    if scheme is not None:
        for target, name in given.items():
            spec = specs[target]
            if spec.schemes and scheme not in spec.schemes and values[target] != spec.default:
                wanted = " or ".join(f"{s}://" for s in spec.schemes)
                raise ConfigurationError(f"{where}: option {name!r} applies only to {wanted} URLs")
    return values


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        kind, kind.__name__
    )
