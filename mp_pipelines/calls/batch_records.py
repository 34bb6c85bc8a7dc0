"""Batch ids checkpointed in the response store's database, and a batch's admission against the run's budget.

A batch is written to `mp_llm_batches` as soon as the endpoint has created it, under its run family (the root
run id) and task, with the checkpoint key of every request it carries (by `custom_id`). A re-executed run asks
for the same requests again and finds them here, so it follows the same batch instead of paying twice.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import sqlalchemy as sa

from mp_pipelines.calls.store import RUN_SPEND, ResponseStore

BATCHES = sa.Table(
    "mp_llm_batches",
    sa.MetaData(),
    sa.Column("scope", sa.String(64), primary_key=True),  # root run id of the run family
    sa.Column("task", sa.String(255), primary_key=True),
    sa.Column("batch_id", sa.String(255), primary_key=True),
    sa.Column("run_id", sa.String(64), nullable=False),  # the run that submitted it
    sa.Column("status", sa.String(32), nullable=False),  # submitted; read or cancelled: not to be followed again
    sa.Column("lines", sa.Text, nullable=False),  # JSON {custom_id: checkpoint key}
    sa.Column("created_at", sa.Float, nullable=False),
)
_CREATED: set[int] = set()  # ids of engines whose table exists


@dataclass(frozen=True)
class BatchRecord:
    batch_id: str
    lines: dict[str, str]  # custom_id -> checkpoint key
    status: str


def _table(store: ResponseStore) -> sa.Table:
    if id(store.engine) not in _CREATED:
        for attempt in range(8):  # step processes of a first run race to create it, as for the store's tables
            try:
                BATCHES.create(store.engine, checkfirst=True)
                break
            except sa.exc.DatabaseError:
                if attempt == 7:
                    raise
                time.sleep(0.05 * 2 ** attempt)
        _CREATED.add(id(store.engine))
    return BATCHES


def save_batch(store: ResponseStore, scope: str, task: str, batch_id: str, run_id: str, lines: dict[str, str]) -> None:
    """Checkpoint a batch the endpoint has just created (committed before this returns)."""
    table = _table(store)
    with store.engine.begin() as conn:
        conn.execute(table.insert().values(scope=scope, task=task, batch_id=batch_id, run_id=run_id,
                                           status="submitted", lines=json.dumps(lines), created_at=time.time()))


def batches_of(store: ResponseStore, scope: str, task: str) -> list[BatchRecord]:
    """The batches a run family submitted for a task that may still be followed, oldest first."""
    table = _table(store)
    query = (sa.select(table.c.batch_id, table.c.lines, table.c.status)
             .where(table.c.scope == scope, table.c.task == task, table.c.status == "submitted")
             .order_by(table.c.created_at))
    with store.engine.connect() as conn:
        return [BatchRecord(row.batch_id, json.loads(row.lines), row.status) for row in conn.execute(query)]


def mark_batch(store: ResponseStore, scope: str, task: str, batch_id: str, status: str) -> None:
    table = _table(store)
    with store.engine.begin() as conn:
        conn.execute(table.update().where(table.c.scope == scope, table.c.task == task, table.c.batch_id == batch_id)
                     .values(status=status))


def reserve_batch(store: ResponseStore, run_id: str, calls: int, tokens: int, cost_usd: float,
                  max_calls: int | None, max_tokens: int | None,
                  max_cost_usd: float | None) -> tuple[bool, int, int, float]:
    """Count a batch's calls and estimated tokens and cost for the run if all of them fit every limit, atomically
    across processes. Returns (admitted, calls, tokens, cost) as the account holds them after the attempt."""
    c = RUN_SPEND.c
    within = [c.run_id == run_id]
    for column, amount, limit in ((c.calls, calls, max_calls), (c.tokens, tokens, max_tokens),
                                  (c.cost_usd, cost_usd, max_cost_usd)):
        if limit is not None:
            within.append(column + amount <= limit)
    with store.engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {RUN_SPEND.name} (run_id, calls, tokens, cost_usd) VALUES (:run_id, 0, 0, 0) "
                             "ON CONFLICT (run_id) DO NOTHING"), {"run_id": run_id})
        admitted = conn.execute(RUN_SPEND.update().where(*within).values(
            calls=c.calls + calls, tokens=c.tokens + tokens, cost_usd=c.cost_usd + cost_usd)).rowcount == 1
        row = conn.execute(sa.select(c.calls, c.tokens, c.cost_usd).where(c.run_id == run_id)).one()
    return admitted, int(row.calls), int(row.tokens), float(row.cost_usd)


def adjust_spend(store: ResponseStore, run_id: str, tokens: int, cost_usd: float) -> None:
    """Replace a batch's estimate by what it spent (the differences, which may be negative)."""
    if tokens or cost_usd:
        with store.engine.begin() as conn:
            conn.execute(RUN_SPEND.update().where(RUN_SPEND.c.run_id == run_id).values(
                tokens=RUN_SPEND.c.tokens + tokens, cost_usd=RUN_SPEND.c.cost_usd + cost_usd))
