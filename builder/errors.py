"""The builder's error type. It shares the appliance's base class, so one handler in `builder.cli`
reports both (the builder also meets the appliance's contract errors: a bad corpus file, a manifest)."""

from appliance.errors import ApplianceError, ExitCode


class BuilderError(ApplianceError):
    """A build step cannot go on; the message names the cause and `fix` what to do."""


class BuilderConfigError(BuilderError):
    """A config file is missing, not YAML, or has invalid fields."""

    exit_code = ExitCode.CONFIG


class GateFailed(BuilderError):
    """The evaluation ran and the model did not meet the release gate."""

    exit_code = ExitCode.GATE
