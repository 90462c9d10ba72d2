"""User-facing errors: bad input that the CLI reports with exit code 2 and no traceback."""


class UserError(Exception):
    """Bad input from the user (config, data, search space, paths).

    The message names the file/field/value and the fix; the CLI prints it and exits 2.
    """


class ConfigError(UserError):
    """A config or search-space key/value is unknown or impossible."""


class DataError(UserError):
    """A data manifest or shard is unreadable or inconsistent."""

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class TrialCrash(Exception):
    """A trial crashed (a bug, out of memory).

    The CLI prints which trial and where its traceback is, and exits 1.
    """
