"""Errors a user can act on.

Every layer raises a subclass of :class:`VisionAutoMLError` for problems caused by
input (data, config, environment). The CLI prints them as one clear message and
exits non-zero, without a traceback; anything else is a bug and keeps its traceback.
"""


class VisionAutoMLError(Exception):
    """Base class of every error whose message tells the user what to fix."""


class DataError(VisionAutoMLError):
    """A dataset, annotation or image is unusable."""


class ConfigError(VisionAutoMLError):
    """A configuration file or value is invalid."""


class FetchError(VisionAutoMLError):
    """A download or an archive extraction failed or was refused."""


class TrainingError(VisionAutoMLError):
    """A training run could not continue (diverged, out of budget, bad weights)."""


class TrackingError(VisionAutoMLError):
    """The tracking server or the model registry refused or failed a request."""


def first_line(error: BaseException | str, *, limit: int = 300) -> str:
    """The first non-blank line of an error (or of a message), for one-line reports of a failure.

    Library errors often carry a whole traceback or a server's HTML page; the first line is
    the part that says what went wrong. An exception without text is named by its type.
    """
    text = getattr(error, "message", None) or str(error)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if lines:
        return lines[0][:limit]
    return type(error).__name__ if isinstance(error, BaseException) else "unknown error"
