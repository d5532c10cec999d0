"""What a reply tells the agent, from what WRITE_SHARD read beside its heartbeat: ABANDON for a task it
was fenced off (in every reply while it still reports it), ASSIGN for a task offered to it (until it
beats RUNNING on it, which makes it the owner, or the offer expires).

Pure logic: the ingest takes the confirmations this returns to the task registry before replying.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from heartbeat_registry.core.tasks import parse_fences, parse_offers
from heartbeat_registry.pb import hb


class Confirmation(NamedTuple):
    """An agent beat RUNNING on a task offered to it: it takes the task at that epoch."""

    agent_id: str
    task_id: str
    epoch: int


def directives_for(
    beats: Sequence[hb.Heartbeat], news: dict[str, tuple[str, str]], now_ms: int
) -> tuple[list[hb.Directive], list[Confirmation]]:
    """`news`: agent -> (fences, offers) as the ingest's writer returned them."""
    if not news:
        return [], []
    directives: list[hb.Directive] = []
    confirms: list[Confirmation] = []
    done: set[str] = set()
    for beat in reversed(beats):  # an agent's newest beat of the request decides
        agent = beat.agent_id
        found = news.get(agent)
        if found is None or agent in done:
            continue
        done.add(agent)
        fences, offers = found
        epoch = parse_fences(fences).get(beat.task_id) if fences else None
        if epoch is not None:
            directives.append(
                hb.Directive(
                    kind=hb.Directive.ABANDON,
                    agent_id=agent,
                    task_id=beat.task_id,
                    epoch=epoch,
                    reason="task reassigned",
                )
            )
        for offer in parse_offers(offers) if offers else ():
            if offer.deadline_ms <= now_ms:
                continue  # expired: the reassignment sink takes it back
            if beat.task_id == offer.task_id and beat.status == hb.RUNNING:
                confirms.append(Confirmation(agent, offer.task_id, offer.epoch))
            else:
                directives.append(
                    hb.Directive(
                        kind=hb.Directive.ASSIGN,
                        agent_id=agent,
                        task_id=offer.task_id,
                        epoch=offer.epoch,
                        reason=f"assigned until {offer.deadline_ms}",
                    )
                )
    return directives, confirms
