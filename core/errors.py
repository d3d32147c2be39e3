"""The root of every error a user can act on.

Anything raised as a `DefectPruneError` carries a message written for the person at the
keyboard (which file, what is wrong, what to do). The command line prints it on one line and
exits non-zero; the dashboard shows it in an error box. Anything else is a bug.
"""


class DefectPruneError(Exception):
    """An error caused by input (data, arguments, files), with an actionable message."""
