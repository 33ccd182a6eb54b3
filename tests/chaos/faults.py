"""The seeded fault plan and the thread that carries it out.

A plan is a list of faults, each striking once the writers have finished a given number
of logical writes (drawn from the seed, so a run can be repeated). An outage (Redis or
S3 down) lasts until the writers have seen a few failed attempts since it began, or at
most ``OUTAGE_MAX_S``; then the part is brought back and the injector waits for
``serve`` to be healthy (never a fixed sleep). Faults never overlap, except the
combined ones, which kill ``serve`` in the middle of an outage.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tests.chaos.ledger import Ledger
from tests.support.chaos import ChaosCluster

KINDS = (
    "serve_sigkill",  # kill -9 of serve, restarted at once
    "redis_sigkill",  # kill -9 of redis-server, restarted from its AOF
    "s3_stop",  # the S3 server stopped, then started again
    "serve_sigkill_in_redis_outage",  # serve killed while Redis is down
    "serve_sigkill_in_s3_outage",  # serve killed while S3 is down
)
OUTAGE_FAILURES = 3
LEAD = 6  # writes that may finish past a fault's point before it strikes
OUTAGE_MAX_S = 3.0
WAIT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Fault:
    at: int  # logical writes finished when it strikes
    kind: str
    server: int  # the serve process it kills, if it kills one

    def __str__(self) -> str:
        return f"{self.kind}@{self.at}" + (f"/serve{self.server}" if "serve" in self.kind else "")


def fault_plan(
    rng: random.Random, total: int, per_kind: dict[str, int], servers: int = 1
) -> list[Fault]:
    """Faults in a shuffled order, at distinct points between 5% and 85% of the writes."""
    kinds = [kind for kind in KINDS for _ in range(per_kind.get(kind, 0))]
    rng.shuffle(kinds)
    points = sorted(rng.sample(range(total // 20, total * 17 // 20), len(kinds)))
    return [Fault(at, kind, rng.randrange(servers)) for at, kind in zip(points, kinds, strict=True)]


class Injector(threading.Thread):
    def __init__(
        self,
        cluster: ChaosCluster,
        ledger: Ledger,
        plan: list[Fault],
        writers_done: threading.Event,
    ) -> None:
        super().__init__(name="injector", daemon=True)
        self.cluster = cluster
        self.ledger = ledger
        self.plan = plan
        self.done = writers_done
        self.idle = 0  # faults that struck after the writers had finished
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for n, fault in enumerate(self.plan):
                # The writers may run at most LEAD writes past the point before it strikes.
                self.ledger.set_gate(fault.at + LEAD)
                reached = self.ledger.wait_for(
                    lambda ledger, at=fault.at: ledger.finished >= at or self.done.is_set(),
                    WAIT_TIMEOUT_S,
                )
                assert reached, f"the writers never reached {fault.at} writes"
                self.idle += self.done.is_set()
                if n + 1 == len(self.plan):
                    self.ledger.set_gate(float("inf"))
                self.inject(fault)
        except BaseException as exc:
            self.error = exc
            self.ledger.anomaly(f"the fault injector failed: {exc!r}")
        finally:
            self.ledger.set_gate(float("inf"))

    def inject(self, fault: Fault) -> None:
        self.ledger.fault(fault.kind)
        for step in self.steps(fault):
            if self.cluster.closed:
                return  # the test ended (failed) under it: start nothing again
            step()
            self.cluster.bump()  # wake the clients waiting out the outage

    def steps(self, fault: Fault) -> list[Callable[[], object]]:
        c, n = self.cluster, fault.server

        def kill() -> None:
            c.kill_server(n)

        def start() -> None:
            c.restart_server(n)

        down_redis, down_s3 = self.outage(c.redis.kill), self.outage(c.s3.stop)
        plans: dict[str, list[Callable[[], object]]] = {
            "serve_sigkill": [kill, start],
            "redis_sigkill": [down_redis, c.redis.start, c.wait_healthy],
            "s3_stop": [down_s3, c.s3.start],
            "serve_sigkill_in_redis_outage": [down_redis, kill, c.redis.start, c.wait_healthy,
                                              start],
            "serve_sigkill_in_s3_outage": [down_s3, kill, c.s3.start, start],
        }  # fmt: skip
        return plans[fault.kind]

    def outage(self, begin: Callable[[], object]) -> Callable[[], None]:
        """A step that starts an outage, then waits until the writers felt it (a few
        failed attempts), or at most ``OUTAGE_MAX_S``."""

        def step() -> None:
            before = self.ledger.failed_attempts()
            begin()
            self.cluster.bump()
            self.ledger.wait_for(
                lambda ledger: (
                    ledger.failed_attempts() >= before + OUTAGE_FAILURES or self.done.is_set()
                ),
                OUTAGE_MAX_S,
            )

        return step
