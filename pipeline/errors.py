"""Expected failures: the ones a user causes and can fix (bad params, bad data, a missing file,
an unreachable judge).

Stage scripts print such an error's message in one short block and exit with its `exit_code`,
without a traceback (`pipeline.stages._cli.run`); anything else is a bug and keeps Typer's full
traceback. Each error subclasses the built-in it refines (ValueError, FileNotFoundError, ...),
so library callers can keep catching those.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every expected failure; its message names the file, row or key and what to do."""

    exit_code = 1


class ParamsError(PipelineError, ValueError):
    """params.yaml (or a config built in code) is invalid: unknown, missing, mistyped or out-of-range keys."""

    exit_code = 2


class DataError(PipelineError, ValueError):
    """An input data file is unreadable, empty, malformed or has rows that cannot be used."""


class InputNotFoundError(PipelineError, FileNotFoundError):
    """An input file or folder named on the command line or in params.yaml does not exist."""


class ModelLoadError(PipelineError, OSError):
    """A model folder is incomplete or corrupt (missing config, truncated weights, ...)."""


class ServiceError(PipelineError, RuntimeError):
    """A remote service (an OpenAI-compatible judge endpoint) cannot be reached or keeps failing."""
