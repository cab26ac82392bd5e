"""The one exception type whose message is meant for the user, shown as one line."""


class UserError(Exception):
    """Bad input (a path, a name, a setting): the message says what is wrong and what to do."""
