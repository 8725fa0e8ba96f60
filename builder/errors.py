"""The builder's error type. It shares the appliance's base class, so one handler in `builder.cli`
reports both (the builder also meets the appliance's contract errors: a bad corpus file, a manifest)."""

from appliance.errors import ApplianceError


class BuilderError(ApplianceError):
    """A build step cannot go on; the message names the cause and `fix` what to do."""
