"""Never pay twice: LLM answers stored in a database table, keyed by what was asked.

One table, `mp_llm_responses`, in the instance's database (SQLite next to a local instance,
PostgreSQL when the instance is on PostgreSQL, or `MP_CACHE_URL`), so answers survive restarts and
are shared by runs and processes. A row belongs to a *scope*:

- `""`, the shared cache: the key is a hash of endpoint, model, messages, parameters and output
  schema, so any run asking the same thing gets the same answer (policy `read_write`, `read`, `write`);
- a root run id, that run family's checkpoint: every answer a run gets is kept under its call's
  label too, so re-executing the run (resume, "from failure" in the UI) re-uses answers of items
  that completed before the failure even when the cache policy is `off`.

Reads happen on a small thread pool so the shared event loop never waits on the database; writes
are batched by one writer thread (one transaction per batch, flushed within `FLUSH_SECONDS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from mp_pipelines.calls.keys import Entry, decode, encode
from mp_pipelines.llm.types import LLMResult

log = logging.getLogger(__name__)

CACHE_URL_ENV = "MP_CACHE_URL"
CACHE_FILE = "mp_llm_cache.sqlite"
SHARED = ""  # scope of the shared cache
FLUSH_SECONDS = 0.05
_BATCH = 500
_LOOKUP_CHUNK = 500  # keys per lookup query (SQLite allows 32,766 parameters)
_WRITE_ATTEMPTS = 3  # a batch that fails this often is dropped (logged; flush() reports it)
_SETUP_ATTEMPTS = 8  # creating tables / switching to WAL while other processes do the same: ~6 s of retries

_METADATA = sa.MetaData()
RESPONSES = sa.Table(
    "mp_llm_responses",
    _METADATA,
    sa.Column("scope", sa.String(64), primary_key=True),  # SHARED, or the root run id of a checkpoint
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("workflow", sa.String(255), nullable=False, index=True),
    sa.Column("task", sa.String(255), nullable=False),
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("answer", sa.Text, nullable=False),  # JSON of the LLMResult fields worth keeping
    sa.Column("cost_usd", sa.Float, nullable=False, default=0.0),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("hits", sa.Integer, nullable=False, default=0),
    sa.Column("last_hit_at", sa.Float, nullable=True),
)


RUN_SPEND = sa.Table(
    "mp_run_spend",  # every run's spend against its budget, shared by all the run's processes
    _METADATA,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("calls", sa.Integer, nullable=False),  # calls started (admitted), for max_calls
    sa.Column("tokens", sa.Integer, nullable=False),  # prompt + completion tokens of finished calls
    sa.Column("cost_usd", sa.Float, nullable=False),
)
_COLUMNS = tuple(column.name for column in RESPONSES.columns)


class ResponseStore:
    """The table behind one database URL: lookups, batched writes, statistics and clearing."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _engine(url)
        mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        self._insert_sql = (f"INSERT INTO {RESPONSES.name} ({', '.join(_COLUMNS)}) "
                            f"VALUES ({', '.join([mark] * len(_COLUMNS))}) ON CONFLICT (scope, key) DO NOTHING")
        self._open_account_sql = (f"INSERT INTO {RUN_SPEND.name} (run_id, calls, tokens, cost_usd) "
                                  f"VALUES ({mark}, 0, 0, 0) ON CONFLICT (run_id) DO NOTHING")
        create_tables(self.engine, _METADATA.sorted_tables)
        self.write_failures = 0  # batches the writer could not store (flush() reports them)
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mp-cache-read")
        self._lookups: dict[asyncio.AbstractEventLoop, list[tuple[str, str, asyncio.Future]]] = {}
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._pending = 0
        self._idle = threading.Condition()
        self._flush_now = threading.Event()  # someone waits in flush(): write what is queued without gathering
        self._writer = threading.Thread(target=self._write_loop, name="mp-cache-write", daemon=True)
        self._writer.start()

    def __repr__(self) -> str:
        return f"ResponseStore({sa.engine.make_url(self.url).render_as_string(hide_password=True)!r})"

    # -- reads --
    def get(self, scope: str, key: str) -> LLMResult | None:
        """The stored answer, or None; a hit is counted (by the writer, in its next batch)."""
        return self.get_many([(scope, key)]).get((scope, key))

    def get_many(self, wanted: list[tuple[str, str]]) -> dict[tuple[str, str], LLMResult]:
        """The stored answers among (scope, key) pairs, in a few queries; hits are counted like `get`'s."""
        by_scope: dict[str, list[str]] = {}
        for scope, key in wanted:
            by_scope.setdefault(scope, []).append(key)
        found: dict[tuple[str, str], LLMResult] = {}
        with self.engine.connect() as conn:
            for scope, keys in by_scope.items():
                for start in range(0, len(keys), _LOOKUP_CHUNK):
                    rows = conn.execute(sa.select(RESPONSES.c.key, RESPONSES.c.answer, RESPONSES.c.cost_usd).where(
                        RESPONSES.c.scope == scope, RESPONSES.c.key.in_(keys[start:start + _LOOKUP_CHUNK])))
                    for row in rows:
                        found[(scope, row.key)] = decode(row.answer, row.cost_usd)
        now = time.time()
        for scope, key in found:
            self._enqueue("hit", (scope, key, now))
        return found

    async def aget(self, scope: str, key: str) -> LLMResult | None:
        """`get` from the event loop; a store that fails to answer is a miss (logged).

        The lookups a loop asks for in one turn go to the store's threads as one `get_many`: a fan-out's
        items all look up at once, and one query per few hundred keys beats a thread hop and a query each."""
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        waiting = self._lookups.setdefault(loop, [])
        waiting.append((scope, key, answer))
        if len(waiting) == 1:
            loop.call_soon(self._look_up, loop)
        return await answer

    def _look_up(self, loop: asyncio.AbstractEventLoop) -> None:
        waiting = self._lookups.pop(loop, [])
        done = self._readers.submit(self.get_many, [(scope, key) for scope, key, _ in waiting])

        def answer(_: Any) -> None:
            try:
                found = done.result()
            except Exception as exc:  # noqa: BLE001 - the cache must never fail a call it could only have saved
                log.warning("LLM cache lookup in %r failed, calling the model instead: %s", self, exc)
                found = {}
            for scope, key, future in waiting:
                if not future.done():  # a caller may have been cancelled meanwhile
                    future.set_result(found.get((scope, key)))

        def back_on_the_loop(_: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
                loop.call_soon_threadsafe(answer, None)

        done.add_done_callback(back_on_the_loop)

    # -- writes --
    def put(self, entry: Entry) -> None:
        """Store an answer soon (the writer batches); an existing row for the same key is kept."""
        self._enqueue("put", entry)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued write is done; False if that took longer than `timeout` or a write failed."""
        deadline = time.monotonic() + timeout
        failures = self.write_failures
        with self._idle:
            while self._pending:
                self._flush_now.set()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return self.write_failures == failures

    def _enqueue(self, kind: str, item: Any) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put((kind, item))

    def _write_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            self._flush_now.wait(FLUSH_SECONDS)  # let a burst gather into one transaction, unless flush() waits
            self._flush_now.clear()
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for attempt in range(_WRITE_ATTEMPTS):
                try:
                    self._write(batch)
                    break
                except sa.exc.OperationalError as exc:  # locked, connection lost: likely to pass
                    if attempt < _WRITE_ATTEMPTS - 1:
                        log.warning("Writing %d LLM cache row(s) to %r failed, trying again: %s", len(batch), self,
                                    exc.orig)
                        time.sleep(0.2 * 2 ** attempt)
                        continue
                    self._lost(batch)
                except Exception:  # noqa: BLE001 - a cache write must never fail a run; the answer was used
                    self._lost(batch)
                    break
            with self._idle:
                self._pending -= len(batch)
                self._idle.notify_all()

    def _lost(self, batch: list[tuple[str, Any]]) -> None:
        self.write_failures += 1
        log.exception("Could not write %d LLM cache row(s) to %r", len(batch), self)

    def _write(self, batch: list[tuple[str, Any]]) -> None:
        rows = {}
        hits: dict[tuple[str, str], float] = {}
        for kind, item in batch:
            if kind == "put":
                cost = item.result.cost_usd
                rows[(item.scope, item.key)] = {
                    "scope": item.scope, "key": item.key, "workflow": item.workflow, "task": item.task,
                    "model": item.result.model, "answer": encode(item.result), "cost_usd": cost,
                    "created_at": time.time(), "hits": 0, "last_hit_at": None}
            else:
                scope, key, when = item
                hits[(scope, key)] = when
        with self.engine.begin() as conn:
            if rows:  # the driver's executemany: SQLAlchemy's per-statement compilation costs ~1 ms a row here
                conn.exec_driver_sql(self._insert_sql, [tuple(row[c] for c in _COLUMNS) for row in rows.values()])
            for (scope, key), when in hits.items():
                conn.execute(RESPONSES.update().where(RESPONSES.c.scope == scope, RESPONSES.c.key == key)
                             .values(hits=RESPONSES.c.hits + 1, last_hit_at=when))

    # -- run budgets --
    def reserve_call(self, run_id: str, max_calls: int | None, max_tokens: int | None,
                     max_cost_usd: float | None) -> tuple[bool, int, int, float]:
        """Count one more call for the run if every limit is still unreached, atomically across processes.

        Returns (admitted, calls started, tokens, cost) as the database holds them after the attempt.
        """
        c = RUN_SPEND.c
        within = [c.run_id == run_id]
        for column, limit in ((c.calls, max_calls), (c.tokens, max_tokens), (c.cost_usd, max_cost_usd)):
            if limit is not None:
                within.append(column < limit)
        with self.engine.begin() as conn:
            conn.exec_driver_sql(self._open_account_sql, (run_id,))
            admitted = conn.execute(RUN_SPEND.update().where(*within).values(calls=c.calls + 1)).rowcount == 1
            row = conn.execute(sa.select(c.calls, c.tokens, c.cost_usd).where(c.run_id == run_id)).one()
        return admitted, int(row.calls), int(row.tokens), float(row.cost_usd)

    def add_spend(self, run_id: str, tokens: int, cost_usd: float) -> None:
        """Add a finished call's tokens and cost to the run's account."""
        if tokens or cost_usd:
            with self.engine.begin() as conn:
                conn.execute(RUN_SPEND.update().where(RUN_SPEND.c.run_id == run_id).values(
                    tokens=RUN_SPEND.c.tokens + tokens, cost_usd=RUN_SPEND.c.cost_usd + cost_usd))

    async def arun(self, fn: Any, *args: Any) -> Any:
        """`fn(*args)` on the store's threads, from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._readers, fn, *args)

    # -- maintenance --
    def stats(self) -> dict[str, Any]:
        """Rows, hits and the dollars hits saved, overall and per workflow (shared cache and checkpoints apart)."""
        c = RESPONSES.c
        kind = sa.case((c.scope == SHARED, "cache"), else_="checkpoint")
        query = (sa.select(c.workflow, kind.label("kind"), sa.func.count().label("entries"),
                           sa.func.coalesce(sa.func.sum(c.hits), 0).label("hits"),
                           sa.func.coalesce(sa.func.sum(c.hits * c.cost_usd), 0.0).label("saved_usd"),
                           sa.func.min(c.created_at).label("oldest"), sa.func.max(c.created_at).label("newest"))
                 .group_by(c.workflow, kind).order_by(c.workflow, kind))
        self.flush()
        with self.engine.connect() as conn:
            groups = [dict(row._mapping) for row in conn.execute(query)]
        total = {k: sum(g[k] for g in groups) for k in ("entries", "hits", "saved_usd")}
        return {"url": repr(self), "groups": groups, **total}

    def clear(self, workflow: str | None = None, older_than_days: float | None = None) -> int:
        """Delete rows (of one workflow, older than some days, or all); returns how many."""
        condition = sa.true()
        if workflow is not None:
            condition = sa.and_(condition, RESPONSES.c.workflow == workflow)
        if older_than_days is not None:
            condition = sa.and_(condition, RESPONSES.c.created_at < time.time() - older_than_days * 86_400)
        self.flush()
        with self.engine.begin() as conn:
            return conn.execute(RESPONSES.delete().where(condition)).rowcount

    def count(self, scope: str | None = None) -> int:
        """Rows stored (in one scope when given)."""
        query = sa.select(sa.func.count()).select_from(RESPONSES)
        if scope is not None:
            query = query.where(RESPONSES.c.scope == scope)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())


def create_tables(engine: sa.engine.Engine, tables: list[sa.Table]) -> None:
    """Create `tables` and their indexes if they are missing. Processes opening a new store at the same moment race
    here (every shard step of a first run does): IF NOT EXISTS covers most of it, and a lost race (SQLite's
    immediate "database is locked" while another connection switches the file to WAL, PostgreSQL's duplicate
    catalog row) is tried again."""
    for attempt in range(_SETUP_ATTEMPTS):
        try:
            with engine.begin() as conn:
                for table in tables:
                    conn.execute(sa.schema.CreateTable(table, if_not_exists=True))
                    for index in table.indexes:
                        conn.execute(sa.schema.CreateIndex(index, if_not_exists=True))
            return
        except sa.exc.DatabaseError:
            if attempt == _SETUP_ATTEMPTS - 1:
                raise
            time.sleep(0.05 * 2 ** min(attempt, 5))


def _engine(url: str) -> sa.engine.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _wal(dbapi_connection: Any, _: Any) -> None:  # readers and the writer do not block each other
            # WAL is a property of the file: switch once. The switch needs an exclusive lock and SQLite answers
            # "database is locked" at once (no busy wait) while another connection holds one, so try a few times.
            for attempt in range(_SETUP_ATTEMPTS):
                try:
                    if dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                        dbapi_connection.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError:
                    if attempt == _SETUP_ATTEMPTS - 1:
                        raise
                    time.sleep(0.05 * 2 ** min(attempt, 5))
            dbapi_connection.execute("PRAGMA synchronous=NORMAL")

        return engine
    return sa.create_engine(url, pool_size=4, max_overflow=4, pool_pre_ping=True)


def cache_url(instance: Any) -> str | None:
    """Where the cache lives for an instance: MP_CACHE_URL, the instance's PostgreSQL, or a SQLite file in
    its folder; None for an ephemeral instance (nothing to persist next to)."""
    configured = os.environ.get(CACHE_URL_ENV, "").strip()
    if configured.lower() in ("none", "off"):
        return None  # no cache and no checkpoints: every call is made, a resumed run calls everything again
    if configured:
        return configured
    postgres_url = getattr(getattr(instance, "run_storage", None), "postgres_url", None)
    if postgres_url:
        return postgres_url
    if instance.is_ephemeral:
        return None
    return f"sqlite:///{Path(instance.root_directory) / CACHE_FILE}"


_STORES: dict[tuple[str, int], ResponseStore] = {}
_STORES_LOCK = threading.Lock()


def store_for_url(url: str) -> ResponseStore:
    """One store per database URL and process (a forked child builds its own engine and writer)."""
    key = (url, os.getpid())
    with _STORES_LOCK:
        if key not in _STORES:
            _STORES[key] = ResponseStore(url)
        return _STORES[key]


def store_for(instance: Any) -> ResponseStore | None:
    """The store of an instance (see `cache_url`), or None when there is nowhere to keep answers or the
    database cannot be reached (logged: runs go on without cache and checkpoints)."""
    return open_store(instance)[0]


def open_store(instance: Any, *, warn: bool = True) -> tuple[ResponseStore | None, str | None]:
    """(the store of an instance, None) or (None, why there is none, as a clause for a message).

    The cache can do without a store, so a database that cannot be reached is only logged (unless `warn` is
    false: a caller about to refuse says it better); what cannot do without one (a budget shared by several
    processes) uses the reason to refuse, saying why."""
    url = cache_url(instance)
    if not url:
        configured = os.environ.get(CACHE_URL_ENV, "").strip()
        return None, (f"{CACHE_URL_ENV} is {configured!r}" if configured
                      else "the Dagster instance is ephemeral (it has no database to keep it in)")
    try:
        return store_for_url(url), None
    except Exception as exc:  # noqa: BLE001 - whatever stops it opening, there is no store; the caller decides
        where = _shown(url)
        cause = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
        if warn:
            log.warning("LLM response store at %s is unavailable, running without it: %s", where, cause)
        return None, f"the response store at {where} cannot be opened ({cause})"


def _shown(url: str) -> str:
    """A database URL fit for messages: without its password (and not echoed at all when it does not parse)."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return f"{CACHE_URL_ENV} (not a database URL)"
