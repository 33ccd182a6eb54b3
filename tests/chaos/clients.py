"""The chaos clients, one thread each: appenders (unique ids per row), key writers
(upserts and deletes of the keys each one owns, so every acknowledged change says what
its keys hold) and a reader. Every write carries an ``Idempotency-Key`` and is sent again,
the same request with the same key, on a connection error or a 5xx, up to
``MAX_ATTEMPTS`` times; each client's payloads come from its own seeded RNG."""

from __future__ import annotations

import random
import threading
from typing import Any

import httpx

from tests.chaos.ledger import Batch, Ledger
from tests.support.chaos import ChaosCluster

ORG, SUP = "acme", "chaos"
BASE = f"/v1/{ORG}/{SUP}"
QUERY = f"{BASE}/query"
APPENDS, KEYED = "events", "kv"
MAX_ATTEMPTS = 120
REQUEST_TIMEOUT_S = 30.0
ID_SPAN = 10_000_000  # appender n writes ids n * ID_SPAN + op * 1000 + row
KEY_SPAN = 100_000  # key writer n owns keys n * KEY_SPAN + [0, keys)
QUERY_LIMIT = 100_000
GATE_TIMEOUT_S = 600.0
RESEND = 0.1  # the share of acknowledged writes sent once more with their key


def table_path(table: str, suffix: str = "") -> str:
    return f"{BASE}/tables/{table}{suffix}"


def error_kind(response: httpx.Response) -> str:
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "?"
    return f"{response.status_code} {code}"


class Session:
    """One client's HTTP connections to the ``serve`` processes running now: its home
    server first, the next one after a failed attempt (a load balancer's retry)."""

    def __init__(
        self, cluster: ChaosCluster, ledger: Ledger, rng: random.Random, home: int = 0
    ) -> None:
        self.cluster = cluster
        self.ledger = ledger
        self.rng = rng
        self.home = home
        self.http = httpx.Client(timeout=REQUEST_TIMEOUT_S, headers=cluster.headers())

    def send(
        self, path: str, *, key: str, body: Any, params: dict[str, str] | None = None
    ) -> tuple[httpx.Response | None, int]:
        """POST until an answer below 500 (returned with the attempts it took), or None
        after ``MAX_ATTEMPTS``. Between attempts it waits for the cluster to change (a
        repair), at most a jittered, growing backoff."""
        seen = self.cluster.generation
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                response = self.http.post(
                    self.cluster.url(self.home + attempt - 1) + path,
                    json=body,
                    params=params,
                    headers={"Idempotency-Key": key},
                )
            except httpx.TransportError as exc:
                kind = type(exc).__name__
            else:
                if response.status_code < 500:
                    return response, attempt
                kind = error_kind(response)
            self.ledger.failed(kind)
            backoff = min(0.5, 0.01 * 2 ** min(attempt, 6)) * (0.5 + self.rng.random())
            seen = self.cluster.wait_change(seen, backoff)
        return None, MAX_ATTEMPTS

    def query(self, sql: str) -> list[list[Any]] | None:
        """Rows of a query, or None if it failed (counted, not retried: readers go on)."""
        try:
            response = self.http.post(
                self.cluster.url(self.home) + QUERY, json={"sql": sql, "limit": QUERY_LIMIT}
            )
        except httpx.TransportError as exc:
            self.ledger.read_failed(type(exc).__name__)
            return None
        if response.status_code >= 500:
            self.ledger.read_failed(error_kind(response))
            return None
        if response.status_code != 200:
            self.ledger.anomaly(f"query {sql!r}: {response.status_code} {response.text}")
            return None
        body = response.json()
        if body["truncated"]:
            self.ledger.anomaly(f"query {sql!r} was truncated")
        self.ledger.read_ok()
        rows: list[list[Any]] = body["rows"]
        return rows

    def close(self) -> None:
        self.http.close()


class Client(threading.Thread):
    """A bounded loop of ``ops`` operations; a crash is an anomaly, not a lost thread."""

    def __init__(
        self, name: str, n: int, ops: int, cluster: ChaosCluster, ledger: Ledger, seed: int
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.n = n
        self.ops = ops
        self.ledger = ledger
        self.seed = seed
        self.rng = random.Random(f"{seed}/{name}")
        backoff = random.Random(f"{seed}/{name}/backoff")
        self.session = Session(cluster, ledger, backoff, home=n)
        self.resends = random.Random(f"{seed}/{name}/resend")

    def run(self) -> None:
        try:
            for i in range(self.ops):
                if not self.ledger.pass_gate(GATE_TIMEOUT_S):
                    self.ledger.anomaly(f"{self.name}: the fault injector never let it go on")
                    return
                self.one(i)
        except Exception as exc:
            self.ledger.anomaly(f"{self.name} crashed: {exc!r}")
        finally:
            self.session.close()

    def one(self, i: int) -> None:
        raise NotImplementedError

    def acknowledged(
        self, what: str, kind: str, table: str, response: httpx.Response | None, attempts: int
    ) -> dict[str, Any] | None:
        """The answer of an acknowledged write; None (recorded) for any other outcome."""
        if response is None:
            return None
        if response.status_code != 200:
            self.ledger.anomaly(f"{what}: rejected with {response.status_code} {response.text}")
            return None
        answer: dict[str, Any] = response.json()
        self.ledger.acked(kind, table, answer, attempts)
        return answer

    def resend(
        self, what: str, path: str, key: str, body: Any, answer: dict[str, Any],
        params: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        """Now and then (``RESEND``), send an acknowledged write again with its key, as a
        client that lost the answer would: it must be answered as the first, not applied
        again."""
        if self.resends.random() >= RESEND:
            return
        response, _ = self.session.send(path, key=key, body=body, params=params)
        self.ledger.resent_one()
        if response is None or response.status_code != 200:
            status = "no answer" if response is None else f"{response.status_code} {response.text}"
            self.ledger.anomaly(f"{what} sent again: {status}")
            return
        again = response.json()
        if not again.get("replayed") or again.get("version") != answer.get("version"):
            self.ledger.anomaly(f"{what} sent again was applied again: {again} after {answer}")


class Appender(Client):
    """Appends batches of rows with unique ids: mostly a few rows (inlined in the event),
    sometimes over a hundred (a Parquet file in S3)."""

    def one(self, i: int) -> None:
        size = self.rng.randint(101, 160) if self.rng.random() < 0.3 else self.rng.randint(1, 12)
        ids = tuple(self.n * ID_SPAN + i * 1000 + j for j in range(size))
        rows = [{"id": x, "w": self.n, "op": i, "note": f"a{self.n}-{i}-{x % 1000}"} for x in ids]
        key = f"append-{self.seed}-{self.n}-{i}"
        batch = Batch(key, ids)
        response, attempts = self.session.send(table_path(APPENDS, "/rows"), key=key, body=rows)
        answer = self.acknowledged(f"append {key}", "append", APPENDS, response, attempts)
        if answer is None:
            self.ledger.given_up(f"append {key}", batch)
            return
        if answer["rows"] != size:
            self.ledger.anomaly(f"append {key}: {answer['rows']} rows acknowledged of {size}")
        self.ledger.appended(batch)
        self.resend(f"append {key}", table_path(APPENDS, "/rows"), key, rows, answer)


class KeyWriter(Client):
    """Upserts (70%) and deletes by key of the keys it alone writes, so that after each
    acknowledged change it knows what those keys hold; now and then it reads them back
    (read-your-writes through a query)."""

    KEYS = 400

    def one(self, i: int) -> None:
        owned = range(self.n * KEY_SPAN, self.n * KEY_SPAN + self.KEYS)
        key = f"change-{self.seed}-{self.n}-{i}"
        if i == 0 or self.rng.random() < 0.7:
            many = self.rng.random() < 0.25
            keys = self.rng.sample(owned, self.rng.randint(101, 180) if many else
                                   self.rng.randint(1, 8))  # fmt: skip
            value = self.n * ID_SPAN + i
            values: dict[int, int | None] = dict.fromkeys(keys, value)
            rows = [{"k": k, "w": self.n, "v": value} for k in keys]
            upsert = {"mode": "upsert", "key": "k"}
            self.change("upsert", key, table_path(KEYED, "/rows"), rows, values, upsert)
        else:
            keys = self.rng.sample(owned, self.rng.randint(1, 12))
            body = {"keys": {"k": keys}}
            self.change("delete", key, table_path(KEYED, "/delete"), body, dict.fromkeys(keys))

    def change(
        self,
        kind: str,
        key: str,
        path: str,
        body: Any,
        values: dict[int, int | None],
        params: dict[str, str] | None = None,
    ) -> None:
        """Send one change until acknowledged; ``values``: what its keys then hold."""
        response, attempts = self.session.send(path, key=key, body=body, params=params)
        answer = self.acknowledged(f"{kind} {key}", kind, KEYED, response, attempts)
        if answer is None:
            self.ledger.given_up(f"{kind} {key}")
            self.ledger.changed(values, sure=False)
            return
        self.ledger.changed(values, sure=True)
        self.resend(f"{kind} {key}", path, key, body, answer, params)
        if self.rng.random() < 0.3:
            self.read_back(key, values)

    def read_back(self, key: str, values: dict[int, int | None]) -> None:
        listed = ", ".join(map(str, sorted(values)))
        rows = self.session.query(f"select k, v from {KEYED} where k in ({listed})")
        if rows is None:
            return
        found: dict[int, int | None] = dict.fromkeys(values)
        for k, v in rows:
            if found.get(k) is not None:
                self.ledger.anomaly(f"read after {key}: key {k} appears twice")
            found[k] = v
        if found != values:
            wrong = {k: (found[k], values[k]) for k in values if found[k] != values[k]}
            self.ledger.anomaly(f"read after {key}: (read, written) differ for {wrong}")


class Reader(Client):
    """Reads while the writes go on: a read that begins after a write was acknowledged
    must see it (row counts, table versions), and no id may ever appear twice."""

    def __init__(self, *args: Any, stop: threading.Event, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop = stop

    def one(self, i: int) -> None:
        if self.stop.is_set():
            return
        rows_floor, version_floor = self.ledger.floor(APPENDS)
        self.session.home = i  # each read from the next server
        if rows_floor and self.rng.random() < 0.5:  # (no table before the first append)
            rows = self.session.query(f"select count(*), count(distinct id) from {APPENDS}")
            if rows is not None:
                n, distinct = rows[0]
                if n != distinct:
                    self.ledger.anomaly(f"read {i}: {n} rows but {distinct} distinct ids")
                if n < rows_floor:
                    self.ledger.anomaly(f"read {i}: {n} rows, {rows_floor} acknowledged before")
        else:
            self.detail(i, version_floor)
        self.session.cluster.wait_change(self.session.cluster.generation, 0.05)  # pacing

    def detail(self, i: int, floor: int) -> None:
        try:
            response = self.session.http.get(self.session.cluster.url(i) + table_path(APPENDS))
        except httpx.TransportError as exc:
            self.ledger.read_failed(type(exc).__name__)
            return
        if response.status_code == 404 and floor == 0:
            return
        if response.status_code >= 500:
            self.ledger.read_failed(error_kind(response))
            return
        if response.status_code != 200:
            self.ledger.anomaly(f"read {i}: table detail {response.status_code} {response.text}")
            return
        self.ledger.read_ok()
        version = response.json()["version"]
        if version < floor:
            self.ledger.anomaly(f"read {i}: version {version}, {floor} acknowledged before")
