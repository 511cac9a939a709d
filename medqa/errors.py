"""The one exception type the project raises for problems a user can fix."""


class MedQAError(Exception):
    """A setting, a data file or a download is wrong; the message says what and how to fix it."""
