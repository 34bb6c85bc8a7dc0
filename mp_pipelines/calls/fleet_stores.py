"""The stores of the fleet's shared limits: rates, in-flight slots and 429 pauses, in Redis or a SQL database.

`SharedLimits` (`fleet.py`) is what the limiter needs of shared storage; two stores implement it:

- `RedisLimits` (`MP_LIMITS_REDIS_URL`): one hash per key, changed by a Lua script in one round trip, on the
  Redis server's clock;
- `SqlLimits`: two tables in the response store's database (the instance's PostgreSQL, or the SQLite file next
  to a local instance, which the processes of one machine share), each reservation one upsert statement.

Rates are reservations (a generic cell rate algorithm): each call moves the key's "next free time" on by its
cost, 60/requests_per_minute seconds for a request and tokens × 60/tokens_per_minute for its tokens, never
earlier than now or the key's pause, and waits until its own turn. Callers in any process therefore get
evenly spaced turns and the total rate never exceeds the limit, without a burst after a quiet spell. A
paused key gives no turn before the pause ends; a caller whose turn was booked before a pause began looks
again when its turn comes. In-flight slots are leases that the holding process renews while it lives, so a
killed process gives its slots back within one lease.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import sqlalchemy as sa

from mp_pipelines.calls.fleet import fleet_key
from mp_pipelines.calls.store import create_tables

__all__ = ["LIMITS_REDIS_URL_ENV", "RedisLimits", "SqlLimits", "fleet_key", "open_shared_limits"]

log = logging.getLogger(__name__)

LIMITS_REDIS_URL_ENV = "MP_LIMITS_REDIS_URL"
_RATES = "mp_fleet_limits"
_SLOTS = "mp_fleet_slots"
_EXPIRE_SECONDS = 3600  # Redis keys of limits nobody used for an hour go away


# ---------------------------------------------------------------------------------------------- Redis

_RESERVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local v = redis.call('HMGET', KEYS[1], 'r', 't', 'p')
local paused = tonumber(v[3]) or 0
local r = math.max(tonumber(v[1]) or 0, now, paused)
local k = math.max(tonumber(v[2]) or 0, now, paused)
redis.call('HSET', KEYS[1], 'r', string.format('%.6f', r + tonumber(ARGV[1])),
           't', string.format('%.6f', k + tonumber(ARGV[2])))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return string.format('%.6f', math.max(r, k) - now)
"""
_PAUSE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local paused = tonumber(redis.call('HGET', KEYS[1], 'p')) or 0
redis.call('HSET', KEYS[1], 'p', string.format('%.6f', math.max(paused, now + tonumber(ARGV[1]))))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""
_PAUSED_FOR_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local paused = tonumber(redis.call('HGET', KEYS[1], 'p')) or 0
return string.format('%.6f', math.max(0, paused - now))
"""
_ENTER_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
  return 1
end
return 0
"""
_RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + tonumber(ARGV[#KEYS + 1]), ARGV[i])
end
return 1
"""


class RedisLimits:
    """Shared limits in Redis (`MP_LIMITS_REDIS_URL`): Lua scripts on the server's clock, one round trip each."""

    def __init__(self, url: str) -> None:
        import redis

        self.url = url
        self._redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)
        self._redis.ping()  # a wrong URL fails here, where the caller can say which setting it came from
        self._reserve = self._redis.register_script(_RESERVE_LUA)
        self._pause = self._redis.register_script(_PAUSE_LUA)
        self._paused_for = self._redis.register_script(_PAUSED_FOR_LUA)
        self._enter = self._redis.register_script(_ENTER_LUA)
        self._renew = self._redis.register_script(_RENEW_LUA)

    def __repr__(self) -> str:
        return f"RedisLimits({_shown(self.url)!r})"

    def reserve(self, key: str, request_cost: float, token_cost: float) -> float:
        return float(self._reserve(keys=[f"mp:rate:{key}"], args=[request_cost, token_cost, _EXPIRE_SECONDS]))

    def pause(self, key: str, seconds: float) -> None:
        self._pause(keys=[f"mp:rate:{key}"], args=[seconds, _EXPIRE_SECONDS])

    def paused_for(self, key: str) -> float:
        return float(self._paused_for(keys=[f"mp:rate:{key}"]))

    def enter(self, key: str, limit: int, holder: str, lease: float) -> bool:
        return bool(self._enter(keys=[f"mp:slots:{key}"], args=[limit, holder, lease, _EXPIRE_SECONDS]))

    def leave(self, key: str, holder: str) -> None:
        self._redis.zrem(f"mp:slots:{key}", holder)

    def renew(self, held: list[tuple[str, str]], lease: float) -> None:
        if held:
            self._renew(keys=[f"mp:slots:{key}" for key, _ in held], args=[*(h for _, h in held), lease])


# ---------------------------------------------------------------------------------------------- SQL

_METADATA = sa.MetaData()
RATES = sa.Table(
    _RATES, _METADATA,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("requests_tat", sa.Float, nullable=False),  # next free time (epoch seconds) of the request rate
    sa.Column("tokens_tat", sa.Float, nullable=False),  # ... of the token rate
    sa.Column("paused_until", sa.Float, nullable=False),  # no turn before this (after a 429)
)
SLOTS = sa.Table(
    _SLOTS, _METADATA,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(64), primary_key=True),  # <process token>:<n>
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
)


class SqlLimits:
    """Shared limits in a SQL database (PostgreSQL, or SQLite for the processes of one machine).

    A reservation is one upsert that reads and moves the key's next free time; an in-flight slot is a row,
    taken under a transaction-scoped advisory lock on PostgreSQL (SQLite's write lock serialises it there).
    Times are the processes' clocks (epoch seconds): keep the machines' clocks synchronised (NTP)."""

    def __init__(self, engine: sa.engine.Engine) -> None:
        self.engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        biggest = "GREATEST" if self._postgres else "max"
        create_tables(engine, [RATES, SLOTS])  # with the store's retries of a race lost to another process
        self._reserve_sql = sa.text(
            f"INSERT INTO {_RATES} (key, requests_tat, tokens_tat, paused_until) VALUES (:key, :now + :rc, :now + :tc, 0) "
            f"ON CONFLICT (key) DO UPDATE SET "
            f"requests_tat = {biggest}({_RATES}.requests_tat, :now, {_RATES}.paused_until) + :rc, "
            f"tokens_tat = {biggest}({_RATES}.tokens_tat, :now, {_RATES}.paused_until) + :tc "
            f"RETURNING requests_tat - :rc, tokens_tat - :tc")
        self._pause_sql = sa.text(
            f"INSERT INTO {_RATES} (key, requests_tat, tokens_tat, paused_until) VALUES (:key, 0, 0, :until) "
            f"ON CONFLICT (key) DO UPDATE SET paused_until = {biggest}({_RATES}.paused_until, :until)")
        self._enter_sql = sa.text(
            f"INSERT INTO {_SLOTS} (key, holder, expires_at) SELECT :key, :holder, :expires "
            f"WHERE (SELECT count(*) FROM {_SLOTS} WHERE key = :key) < :limit")

    def __repr__(self) -> str:
        return f"SqlLimits({_shown(str(self.engine.url))!r})"

    def reserve(self, key: str, request_cost: float, token_cost: float) -> float:
        now = time.time()
        with self.engine.begin() as conn:
            requests_at, tokens_at = conn.execute(self._reserve_sql, {"key": key, "now": now, "rc": request_cost,
                                                                      "tc": token_cost}).one()
        return max(requests_at, tokens_at) - now

    def pause(self, key: str, seconds: float) -> None:
        with self.engine.begin() as conn:
            conn.execute(self._pause_sql, {"key": key, "until": time.time() + seconds})

    def paused_for(self, key: str) -> float:
        with self.engine.connect() as conn:
            until = conn.execute(sa.select(RATES.c.paused_until).where(RATES.c.key == key)).scalar()
        return max(0.0, (until or 0.0) - time.time())

    def enter(self, key: str, limit: int, holder: str, lease: float) -> bool:
        now = time.time()
        with self.engine.begin() as conn:
            if self._postgres:  # one taker at a time per key, until this transaction ends
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:lock)"),
                             {"lock": int(key[:15], 16)})
            conn.execute(sa.delete(SLOTS).where(SLOTS.c.key == key, SLOTS.c.expires_at < now))
            taken = conn.execute(self._enter_sql, {"key": key, "holder": holder, "expires": now + lease,
                                                   "limit": limit}).rowcount
        return taken == 1

    def leave(self, key: str, holder: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.delete(SLOTS).where(SLOTS.c.key == key, SLOTS.c.holder == holder))

    def renew(self, held: list[tuple[str, str]], lease: float) -> None:
        if not held:
            return
        with self.engine.begin() as conn:
            conn.execute(sa.update(SLOTS).where(SLOTS.c.holder.in_([holder for _, holder in held]))
                         .values(expires_at=time.time() + lease))


def _shown(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "(not a URL)"


def open_shared_limits(redis_url: str | None, engine: sa.engine.Engine | None) -> Any:
    """The shared limits in Redis at `redis_url` when given, else in `engine`'s database; None without either."""
    if redis_url:
        return RedisLimits(redis_url)
    if engine is not None:
        return SqlLimits(engine)
    return None
