from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis

from heartbeat_registry.core import redis_client
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.pb import hb_grpc
from ingest.server import Ingest


@pytest.fixture
async def ingest(settings: Settings) -> AsyncIterator[Ingest]:
    node = Ingest(settings)
    await node.start()
    try:
        yield node
    finally:
        await node.stop(grace=1.0)


@pytest.fixture
async def stub(ingest: Ingest, settings: Settings) -> AsyncIterator[hb_grpc.HeartbeatServiceStub]:
    async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
        yield hb_grpc.HeartbeatServiceStub(channel)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = redis_client.connect(settings)
    try:
        yield client
    finally:
        await client.aclose()
