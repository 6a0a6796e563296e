"""Exceptions raised by the node."""

from __future__ import annotations


class NodeError(Exception):
    """Base class for node errors."""


class ConfigError(NodeError):
    """The configuration file or an environment override is invalid."""
