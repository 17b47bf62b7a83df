"""The one error type users see: what went wrong and how to fix it."""


class DoppelError(Exception):
    """A problem the user can act on. The CLI prints it without a traceback."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message
