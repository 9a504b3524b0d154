"""The one exception type for mistakes a user can fix."""


class PipelineError(Exception):
    """Bad input, a missing file or an invalid setting: the CLI prints the message without a traceback."""
