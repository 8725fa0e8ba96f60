"""Exceptions and exit codes.

Errors are raised where the fact is known and carry a `fix` telling the operator what to do; only
`cli.py` turns them into exit codes.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2  # click's own code for bad arguments
    NOT_FOUND = 3
    CONFIG = 4
    MODEL = 5
    STORE = 6
    INGEST = 7
    # a generation directory (an installed model release) is missing or does not match its manifest
    GENERATION = 8
    GATE = 9  # builder: the release gate was not met
    BUNDLE = 10  # an update bundle was refused (signature, hash, version, structure)
    BUSY = 11  # another install holds the lock
    # feedback or a feedback export was refused (unknown answer, text not matching, bad signature)
    FEEDBACK = 12
    ENGINE = 13  # the engine server is busy or went down under a request (the service answers 503)


class ApplianceError(Exception):
    """Base of every error the appliance reports to an operator."""

    exit_code = ExitCode.FAILURE

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message} - {self.fix}" if self.fix else self.message


class ConfigError(ApplianceError):
    exit_code = ExitCode.CONFIG


class NotFoundError(ApplianceError):
    exit_code = ExitCode.NOT_FOUND


class ModelError(ApplianceError):
    exit_code = ExitCode.MODEL


class StoreError(ApplianceError):
    exit_code = ExitCode.STORE


class IngestError(ApplianceError):
    exit_code = ExitCode.INGEST


class GenerationError(ApplianceError):
    """A generation directory is missing, incomplete or does not match its manifest."""

    exit_code = ExitCode.GENERATION


class BundleError(ApplianceError):
    """An update bundle was refused, or the appliance's trust is not set up."""

    exit_code = ExitCode.BUNDLE


class BusyError(ApplianceError):
    """Another install or rollback is running."""

    exit_code = ExitCode.BUSY


class FeedbackError(ApplianceError):
    """Feedback on an answer that cannot be tied to it, or a feedback export that does not verify."""

    exit_code = ExitCode.FEEDBACK
