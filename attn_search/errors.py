"""Errors that end a command with a given exit status (see :mod:`attn_search.cli`)."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input: reported in one line with exit status 2, before the run dir exists."""


class SearchAborted(RuntimeError):
    """The search stopped because its first trials all failed the same way: one line, exit status 1."""
