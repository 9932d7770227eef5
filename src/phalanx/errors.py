"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations

from collections.abc import Iterable


class PhalanxError(Exception):
    """A problem with the user's input (config, files, arguments) that names the fix."""


class ConfigError(PhalanxError):
    """An unknown key, a badly typed value, or contradictory settings."""


def check_choice(key: str, value: object, choices: Iterable[str]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices`` (named by ``key``)."""
    options = list(choices)
    if value not in options:
        raise ConfigError(f"{key}={value!r} is unknown; use one of {', '.join(options)}")
