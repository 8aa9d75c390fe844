"""Exception types: every user-facing failure is a `MoqeError` with a one-line message."""

from __future__ import annotations


class MoqeError(Exception):
    """Base class; the CLI prints ``moqe: error: <message>`` and exits 2."""


class ConfigError(MoqeError, ValueError):
    """Invalid or inconsistent model / run configuration."""


class CheckpointError(MoqeError, ValueError):
    """A checkpoint is missing, corrupt, truncated or does not match the model."""


class QuantizationError(MoqeError, ValueError):
    """Bad weights (NaN/inf), unsupported spec, or a policy that matches nothing."""


class DataError(MoqeError, ValueError):
    """Missing/corrupt corpus, tokenizer mismatch, unknown direction."""
