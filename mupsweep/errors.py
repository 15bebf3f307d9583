"""The one exception type that means "the user gave us something we cannot use".

The CLI turns a `UserError` into one line on stderr and exit code 2, so library code raises it
with a message that names the key, path or layer at fault and says what to do next.
"""


class UserError(Exception):
    """Bad input: a config value, a path, a storage URL. Printed as one line, exit code 2."""


class CheckFailed(Exception):
    """The work ran and failed its own check (a model that is not muP after conversion): one
    line, exit code 1. Not a UserError: the input was valid, the result says no."""
