"""The builder's one error type: a message naming the cause and a fix; `builder.cli` prints both."""


class BuilderError(Exception):
    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message} - {self.fix}" if self.fix else self.message
