"""The one exception type the project raises for problems a user can fix, the one way to check for them, and
the one way it retries."""


class MedQAError(Exception):
    """A setting, a data file or a download is wrong; the message says what and how to fix it."""


def require(ok: bool, message: str) -> None:
    """Raise MedQAError(message) unless `ok`: the project's checks of what a user gave, one line each."""
    if not ok:
        raise MedQAError(message)


class StorageError(MedQAError):
    """A file could not be written (full disk, no permission, ...): retries give up on it at once."""


class UnreadableFile(MedQAError):
    """A file the project wrote cannot be read back; `problem` names the file and what is wrong, without the
    `fix`; str() is the whole message."""

    def __init__(self, path, problem: str, fix: str, damaged: bool = True):
        self.path, self.problem, self.fix = path, problem, fix
        cause = ": it was damaged (e.g. by a full disk or an editor)" if damaged else ""
        super().__init__(f"{problem}{cause}. {fix}".rstrip())


def retry(action, tries: int = 3, backoff: float = 2.0, retry_on=(Exception,), give_up_on=()):
    """`action()`, tried up to `tries` times, waiting backoff, 2*backoff, ... seconds between tries, for the
    errors in `retry_on` and not in `give_up_on`; the last error is raised as it is."""
    import tenacity

    wait = tenacity.wait_exponential(multiplier=backoff, min=0, max=60) if backoff else tenacity.wait_none()
    return tenacity.Retrying(stop=tenacity.stop_after_attempt(tries), wait=wait, reraise=True,
                             retry=tenacity.retry_if_exception_type(retry_on)
                             & tenacity.retry_if_not_exception_type(give_up_on))(action)
