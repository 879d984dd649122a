"""Health probes: a backend whose circuit opened is asked for its model list every
``loadbalancer.health_check_interval``; one that answers goes back in (half-open: its next real call
decides)."""

from __future__ import annotations

import asyncio
import logging

from llmq.pipeline.config import BackendConfig, Config
from llmq.pipeline.echo import ECHO_SCHEME
from llmq.stages.dispatch.http_pool import HTTPError, Pool
from llmq.stages.dispatch.routing import BACKEND_UP, Router

log = logging.getLogger("llmq.dispatch")


class Prober:
    def __init__(self, config: Config, *, router: Router, http: Pool) -> None:
        self.interval_s = config.loadbalancer.health_check_interval.seconds
        self.router = router
        self.http = http

    async def run(self) -> None:
        interval = self.interval_s
        while True:
            await asyncio.sleep(interval)
            for name, circuit in self.router.circuits.items():
                if not circuit.open:
                    continue
                try:
                    healthy = await self._probe_one(self.router.backends[name])
                except Exception:  # a loop boundary: a backend must not stay out because a probe broke
                    log.error("probing backend %s failed", name, exc_info=True)
                    continue
                if circuit.probe(healthy):
                    self.router.changed.set()
                    BACKEND_UP.labels(backend=name).set(1)
                    log.info("backend %s probed healthy: back in (half-open)", name)

    async def _probe_one(self, backend: BackendConfig) -> bool:
        if backend.url.startswith(ECHO_SCHEME):
            return True
        try:
            response = await self.http.get(backend.url.rstrip("/") + "/models", timeout_s=5.0)
        except (HTTPError, TimeoutError):
            return False
        return response.is_success
