"""The app of the run's own Prefect API server (:mod:`pacs2bids.prefectserver`): Prefect's own
(``prefect.server.api.server:create_app``), with every SQLite transaction begun ``IMMEDIATE``.

Prefect begins a write transaction ``DEFERRED`` unless its caller asks ``with_for_update``: the
transaction reads, then asks for the write lock, and when another connection committed in
between, SQLite refuses at once (``database is locked``, SQLITE_BUSY_SNAPSHOT: no busy timeout
helps). The server answers 503 and Prefect's client asks again after 2 s (``2 ** try``, with
jitter, no Retry-After). In a run, the lease of the PACS limit taken before each study
(``increment-with-lease``), task runs, logs and events all write to the one database: a small
study waited 1.5-2.6 s for its lease about half the time (issue 12). Begun ``IMMEDIATE``, a
transaction takes the write lock first and waits for it (SQLite's busy timeout, 60 s) instead of
failing: what Prefect itself does where it asks ``with_for_update`` (task run states, work
queues). Reads outside a transaction are unchanged (WAL: they never wait for a writer).

Used only for the server pacs2bids starts for a run on the local SQLite database; a Prefect
server the user runs (PostgreSQL in production) is left as it is.
"""

from __future__ import annotations

from contextlib import asynccontextmanager


def immediate_sqlite_transactions() -> None:
    """Make Prefect's SQLite configuration begin every transaction ``IMMEDIATE`` (idempotent)."""
    from prefect.server.database import configurations

    cls = configurations.AioSqliteConfiguration
    if getattr(cls.begin_transaction, "pacs2bids_immediate", False):
        return
    deferred_or_not = cls.begin_transaction

    @asynccontextmanager
    async def begin_transaction(self, session, with_for_update: bool = False):
        async with deferred_or_not(self, session, with_for_update=True) as transaction:
            yield transaction

    begin_transaction.pacs2bids_immediate = True
    cls.begin_transaction = begin_transaction


def create_app():
    """uvicorn's factory (``--factory pacs2bids.prefectapp:create_app``): Prefect's app, on
    transactions begun ``IMMEDIATE``."""
    immediate_sqlite_transactions()
    from prefect.server.api.server import create_app as prefect_app

    return prefect_app()
