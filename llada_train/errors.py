"""The one channel for user mistakes.

A `UserError` is raised where input is read (config keys, data files, paths, reward code) and
names the key, file or line and what to do. The CLI prints it as `error: ...` and exits 2; every
other exception is a bug and keeps its traceback. It subclasses ValueError so library callers that
catch ValueError keep working; the CLI catches only this class.
"""


class UserError(ValueError):
    """A mistake in what the user gave us; the message says where and what to do."""


class ConfigError(UserError):
    """A config problem: the message names the full dotted key."""
