"""The HTTP admin endpoints (aiohttp, imported only when started): health, readiness, metrics, models."""

from __future__ import annotations

import asyncio
import json
import threading

from edgesplit.deps import require
from edgesplit.errors import ConfigError

__all__ = ["AdminServer"]


class AdminServer:
    """Serves the broker's state over HTTP from a background thread with its own event loop.

    - ``GET /healthz``: 200 while the broker loop runs (liveness).
    - ``GET /readyz``: 200 when at least one live worker holds a bundle, else 503 (readiness).
    - ``GET /metrics``: Prometheus text format.
    - ``GET /v1/models``: bundles, their cuts, which workers hold them, the cloud per-segment profile,
      and for a bundle some worker cannot load, ``errors`` ({worker: why}).

    Args:
        broker: the Broker to describe.
        address: "HOST:PORT" (port 0 picks a free one).
    """

    def __init__(self, broker, address: str = "127.0.0.1:8080"):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--http wants HOST:PORT, got {address!r}")
        self.broker = broker
        self.host, self.port = host.strip("[]"), int(port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "AdminServer":
        web = require("aiohttp.web", "the HTTP admin endpoints")
        require("prometheus_client", "the /metrics endpoint")
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)

        def serve():
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                self._runner = web.AppRunner(app, access_log=None)
                loop.run_until_complete(self._runner.setup())
                site = web.TCPSite(self._runner, self.host, self.port)
                loop.run_until_complete(site.start())
                self.port = site._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported to start()'s caller
                self._error = exc
                self._started.set()
                return
            self._started.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="edgesplit-admin", daemon=True)
        self._thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise ConfigError(f"cannot serve HTTP on {self.host}:{self.port}: {self._error}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    # -- handlers -------------------------------------------------------------------------------
    async def _healthz(self, request):
        web = require("aiohttp.web")
        snap = self.broker.snapshot()
        alive = not snap.get("stopped")
        return web.json_response({"status": "alive" if alive else "stopped"}, status=200 if alive else 503)

    async def _readyz(self, request):
        web = require("aiohttp.web")
        snap = self.broker.snapshot()
        ready = bool(snap.get("ready"))
        body = {"ready": ready, "workers": len(snap.get("workers", ())), "draining": snap.get("draining", False)}
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, request):
        web = require("aiohttp.web")
        body, ctype = self.broker.metrics.render()
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def _models(self, request):
        web = require("aiohttp.web")
        snap = self.broker.snapshot()
        errors = self.broker.load_errors  # replaced whole by the broker thread, never changed in place
        # a bundle some worker cannot load carries "errors": {worker: why}
        bundles = [{**b, "errors": errors[b["id"]]} if b.get("id") in errors else b for b in snap.get("bundles", [])]
        body = {"bundles": bundles, "workers": snap.get("workers", []), "load": snap.get("load"),
                "lost_workers": snap.get("lost", []), "pipelines": snap.get("pipelines", [])}
        return web.Response(text=json.dumps(body, indent=1), content_type="application/json")
