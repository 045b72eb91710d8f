"""The one exception type for user mistakes.

Anything a user can cause (a bad model spec, an empty answer, a prompt too long for the
model) raises `UnpactError` with a message that names the item and says what to do. The
CLI turns it into one line on stderr and exit code 2; everything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class UnpactError(ValueError):
    """A problem with the user's input or environment, explained in its message."""
