"""The one exception type that reaches the user as a single sentence instead of a traceback."""


class UserError(Exception):
    """Bad input the user can fix: the message says what is wrong and what to do."""


class AlreadySaid(UserError):
    """A UserError whose sentence another process printed (rank 0 of the group): exit with 2, print nothing."""
