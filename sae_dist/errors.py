"""Errors a user can fix: a bad config value, a bad input file, a checkpoint that belongs to
another run. The command-line entry points print their message alone (no traceback) and exit 2."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A problem in what the user asked for or gave; the message says what and how to fix it."""


class ConfigError(UserError, ValueError):
    """A configuration value is not allowed; the message names key, value and allowed range."""

    def __init__(self, key: str, value: Any, allowed: str):
        super().__init__(f"config error: {key}={value!r} is not allowed; allowed: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


class DataError(UserError):
    """An input data source is missing, unreadable, empty, or too short for the request."""
