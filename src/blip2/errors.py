"""One small hierarchy of errors, so that the CLI and the service can turn any of them into a clear message."""


class Blip2Error(Exception):
    """Base class of every error blip2 raises on purpose."""


class ImageError(Blip2Error):
    """An image could not be read or decoded. The message names the image."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source or repr(source)}: {reason}")  # an empty path shows as ''


class CheckpointError(Blip2Error):
    """A checkpoint is missing, incomplete or does not fit the model built from its config."""


class InputError(Blip2Error, ValueError):
    """An argument to the API is wrong (empty, mismatched lengths, unsupported option)."""


class IndexFileError(Blip2Error):
    """A search index on disk is missing, unreadable or not what it claims to be. The message names the file."""

    def __init__(self, file: str, reason: str):
        self.file = file
        self.reason = reason
        super().__init__(f"{file}: {reason}")


class IndexMismatchError(InputError):
    """An index holds vectors of another checkpoint or embedding size than the ones given to it."""


class IndexBusyError(Blip2Error):
    """Another process is writing to the index and did not finish within the lock timeout."""
