"""Typed store errors, so callers (API, CLI) map them to a status and a message without parsing text.

Every error carries a `code` (as MLflow's store does) and a message that names the entity involved.
`states.InvalidTransition` is not here: it is a pure lifecycle rule, raised unchanged through the store.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of everything the store raises on purpose."""

    code = "STORE_ERROR"


class NotFound(StoreError):
    """The named job, adapter, pack, ... does not exist."""

    code = "NOT_FOUND"


class Conflict(StoreError):
    """The write clashes with existing rows (a taken name, a reused key); nothing was written."""

    code = "CONFLICT"


class SchemaOutOfDate(StoreError):
    """The database's schema is not the one this lorafleet needs; the message gives the command to run."""

    code = "SCHEMA_OUT_OF_DATE"


class DatabaseUnavailable(StoreError):
    """The database could not be reached (down, restarting, connection lost) or was busy: the same
    operation may work later, so the API answers 503 with `Retry-After` and the controller retries."""

    code = "DATABASE_UNAVAILABLE"


class DatabaseRefused(StoreError):
    """The database refused the operation for a reason other than a conflict or an outage (a value it
    cannot store): trying again will not help."""

    code = "DATABASE_REFUSED"
