"""User-facing errors: the command line prints these as one line, without a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data, paths) rather than a bug in rlhfkit."""


class ConfigError(UserError):
    """The config file or an override is invalid."""


class DataError(UserError):
    """A dataset is missing, unreadable or has a bad row."""


class TrainingError(UserError):
    """Training cannot go on (e.g. a non-finite loss, a checkpoint that cannot be written); the last good checkpoint is kept."""
