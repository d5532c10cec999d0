"""Which stream shards each bridge forwards, when several bridges run.

A shard must have exactly one forwarder at a time: its Kafka partition's watermark says "every heartbeat
received before this has been forwarded", which only the one bridge reading the shard can know. So each
shard has a lease, a Redis key holding the owner's instance id with an expiry (SET NX PX), renewed every
third of its time to live. Live bridges also keep a member entry in one sorted set (score: expiry), so
each can take its fair share: at most ceil(units / live bridges). A bridge that stops renewing (killed,
paused, cut off) loses its shards when the leases expire; the others take them and claim the entries it
read but never acknowledged from the stream's consumer group.

A lease is trusted locally only until `sent + ttl` of the renewal that last confirmed it, measured on the
monotonic clock from before the request: a bridge paused past its lease stops forwarding on its own
before anyone else could have taken the shard.
"""

from __future__ import annotations

import math
import time
from typing import Any

from heartbeat_registry.beats import now_ms

# KEYS[1] lease, ARGV[1] instance, ARGV[2] ttl ms: extend only a lease we hold
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1] lease, ARGV[1] instance: give back only a lease we hold
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class ShardLeases:
    """This bridge's leases on `units` (each a lease key); `refresh()` renews, balances and reports changes."""

    def __init__(self, client: Any, members_key: str, lease_keys: list[str], instance: str, ttl_s: float) -> None:
        self._redis = client
        self._members = members_key
        self._keys = lease_keys
        self.instance = instance
        self._ttl_ms = int(ttl_s * 1000)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._deadline: dict[int, float] = {}  # unit -> monotonic time until which the lease is surely ours
        # start looking for free units at a place of our own, so bridges starting together spread out
        self._offset = hash(instance) % max(1, len(lease_keys))

    @property
    def owned(self) -> set[int]:
        return set(self._deadline)

    def holds(self, unit: int) -> bool:
        deadline = self._deadline.get(unit)
        return deadline is not None and time.monotonic() < deadline

    async def refresh(self) -> tuple[set[int], set[int], set[int]]:
        """Renew, then take free units up to the fair share. Returns (gained, lost, surplus): surplus are
        units held beyond the fair share, to be handed back with `release` once their forwarding stopped."""
        sent = time.monotonic()
        wall = now_ms()
        pipe = self._redis.pipeline(transaction=False)
        pipe.zadd(self._members, {self.instance: wall + self._ttl_ms})
        pipe.zremrangebyscore(self._members, "-inf", wall)
        pipe.zcard(self._members)
        live = max(1, int((await pipe.execute())[2]))
        lost = set()
        for unit in list(self._deadline):
            if await self._renew(keys=[self._keys[unit]], args=[self.instance, self._ttl_ms]):
                self._deadline[unit] = sent + self._ttl_ms / 1000
            else:
                del self._deadline[unit]
                lost.add(unit)
        share = math.ceil(len(self._keys) / live)
        gained = set()
        count = len(self._keys)
        for i in range(count):
            if len(self._deadline) >= share:
                break
            unit = (self._offset + i) % count
            if unit in self._deadline:
                continue
            if await self._redis.set(self._keys[unit], self.instance, nx=True, px=self._ttl_ms):
                self._deadline[unit] = sent + self._ttl_ms / 1000
                gained.add(unit)
        surplus = set(sorted(self._deadline)[share:]) if len(self._deadline) > share else set()
        return gained, lost, surplus

    async def release(self, unit: int) -> None:
        self._deadline.pop(unit, None)
        await self._release(keys=[self._keys[unit]], args=[self.instance])

    async def leave(self) -> None:
        """Give back every lease and the membership (a graceful stop: the others take over at once)."""
        for unit in list(self._deadline):
            await self.release(unit)
        await self._redis.zrem(self._members, self.instance)
