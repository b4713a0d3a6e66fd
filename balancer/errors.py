"""Why the core refuses a request. Handlers map these to HTTP in one place
(`handlers.base.http_error`); the core knows nothing of status codes or routes."""
from __future__ import annotations


class Refused(Exception):
    """The request cannot be done as asked; str(self) says why, for the client."""


class UnknownClient(Refused):
    """No job (or socket) is known under this clientId."""

    def __init__(self, client_id: str):
        super().__init__(f"clientId '{client_id}' is not known")
        self.client_id = client_id


class ResultsWaiting(Refused):
    """The clientId's finished job has results nobody fetched yet."""

    def __init__(self, client_id: str):
        super().__init__(f"clientId '{client_id}' has results waiting; fetch them first or use a new clientId")
        self.client_id = client_id


class FileNotUploaded(Refused):
    """A file input names a file the upload store never issued."""

    def __init__(self, key: str, shown: str):
        super().__init__(f"input '{key}': file '{shown}' was never uploaded; upload it and pass the saved name")
        self.key = key
        self.shown = shown


class Busy(Exception):
    """The bridge cannot take more work now; the client may retry after `retry_after` seconds."""

    def __init__(self, reason: str, retry_after: int):
        super().__init__(reason)
        self.retry_after = retry_after


class TenantBusy(Busy):
    """One tenant has as many jobs waiting as it may (TENANT_MAX_QUEUED); others may still queue."""

    def __init__(self, tenant: str, waiting: int, limit: int, retry_after: int):
        super().__init__(f"tenant '{tenant}' has {waiting} jobs waiting, its limit (TENANT_MAX_QUEUED={limit}); "
                         "retry later", retry_after)
        self.tenant = tenant


class JobFailed(Refused):
    """The clientId's job ended in error; str(self) is its reason."""
