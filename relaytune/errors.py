"""The one exception a stage turns into a single clear line on stderr."""


class RelaytuneError(Exception):
    """Bad input, params or environment that the user can fix. Its message is one line naming the culprit."""
