"""Network faults through Toxiproxy (built by `make install` from its Go module): one proxy per link the
soak breaks (an ingest replica to Redis, a bridge replica to Kafka), faults as Toxiproxy's toxics over its
HTTP API. The calls are a few documented JSON requests, so they are made here directly rather than
through a client package.

What each fault kind means, in toxics (both directions unless said):
- partition: `timeout` with timeout 0: every byte is dropped and connections hang, as when the network
  between the two is cut (no reset, no refusal: the client finds out from its own timeouts);
- latency: `latency` 300 ms +- 100 ms on every reply (downstream);
- reset: `reset_peer`: every connection is reset as soon as it sends;
- bandwidth: `bandwidth` 64 KB/s downstream and upstream.
"""

from __future__ import annotations

from typing import Any

import aiohttp

# (toxic, the directions it acts in)
TOXICS: dict[str, list[tuple[dict[str, Any], tuple[str, ...]]]] = {
    "partition": [({"type": "timeout", "attributes": {"timeout": 0}}, ("upstream", "downstream"))],
    "latency": [({"type": "latency", "attributes": {"latency": 300, "jitter": 100}}, ("downstream",))],
    "reset": [({"type": "reset_peer", "attributes": {"timeout": 0}}, ("upstream", "downstream"))],
    "bandwidth": [({"type": "bandwidth", "attributes": {"rate": 64}}, ("upstream", "downstream"))],
}


class Toxiproxy:
    def __init__(self, api_addr: str) -> None:
        self.base = f"http://{api_addr}"
        self.session: aiohttp.ClientSession | None = None

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        async with self.session.request(method, self.base + path, json=body) as response:
            if response.status >= 300:
                raise RuntimeError(f"toxiproxy {method} {path}: {response.status} {await response.text()}")
            return await response.json() if response.content_type == "application/json" else None

    async def create(self, name: str, listen: str, upstream: str) -> None:
        await self._call("POST", "/proxies", {"name": name, "listen": listen, "upstream": upstream, "enabled": True})

    async def inject(self, proxy: str, kind: str) -> None:
        """Start fault `kind` on `proxy`."""
        for n, (toxic, streams) in enumerate(TOXICS[kind]):
            for stream in streams:
                body = {**toxic, "name": f"{kind}{n}-{stream}", "stream": stream, "toxicity": 1.0}
                await self._call("POST", f"/proxies/{proxy}/toxics", body)

    async def heal(self, proxy: str, kind: str) -> None:
        for n, (_, streams) in enumerate(TOXICS[kind]):
            for stream in streams:
                await self._call("DELETE", f"/proxies/{proxy}/toxics/{kind}{n}-{stream}")

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
