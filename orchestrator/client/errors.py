"""The server's refusals as the client raises them (a module of its own, so every client module shares it
without importing another)."""

from __future__ import annotations

UNAVAILABLE = 503  # the server is up but its database is not: the same request works later


class ApiError(RuntimeError):
    """The server refused a request; `status` is the HTTP code, `problems` the offending fields."""

    def __init__(self, status: int, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status, self.problems = status, problems or []

    @property
    def unavailable(self) -> bool:
        """The server's database is unreachable: asking again later works."""
        return self.status == UNAVAILABLE
