"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""


class PhalanxError(Exception):
    """A problem with the user's input (config, files, arguments) that names the fix."""


class ConfigError(PhalanxError):
    """An unknown key, a badly typed value, or contradictory settings."""
