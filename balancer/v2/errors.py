"""Why the v2 surface refuses a request, by the contract's error codes. `handlers/v2/base.py`
gives each code its HTTP status (one table) and writes the error envelope."""
from __future__ import annotations


class V2Refused(Exception):
    """`code` is the contract's machine-readable code; str(self) the message for a person."""

    def __init__(self, code: str, message: str, details: dict | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.code = code
        self.details = details
        self.retry_after = retry_after
