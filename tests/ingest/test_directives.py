"""What a reply tells an agent about its tasks: pure logic."""

from __future__ import annotations

from heartbeat_registry.beats import heartbeat
from heartbeat_registry.pb import hb
from ingest.directives import Confirmation, directives_for


def kinds(directives: list[hb.Directive]) -> list[tuple[str, str, int]]:
    return [(hb.Directive.Kind.Name(d.kind), d.task_id, d.epoch) for d in directives]


def test_abandon_while_it_reports_the_task_it_was_fenced_off() -> None:
    news = {"a": ("job-1 3;job-0 1", "")}
    out, confirms = directives_for([heartbeat("a", "job-1")], news, now_ms=0)
    assert kinds(out) == [("ABANDON", "job-1", 3)] and confirms == []
    assert directives_for([heartbeat("a", "job-9")], news, now_ms=0) == ([], [])


def test_assign_until_it_beats_running_on_the_task_or_the_offer_expires() -> None:
    news = {"b": ("", "job-2 4 5000")}
    out, confirms = directives_for([heartbeat("b", "", hb.IDLE)], news, now_ms=1000)
    assert kinds(out) == [("ASSIGN", "job-2", 4)] and confirms == []
    out, confirms = directives_for([heartbeat("b", "job-2", hb.RUNNING)], news, now_ms=1000)
    assert out == [] and confirms == [Confirmation("b", "job-2", 4)]
    assert directives_for([heartbeat("b", "", hb.IDLE)], news, now_ms=5000) == ([], [])  # expired


def test_a_batch_answers_each_agent_from_its_newest_beat() -> None:
    news = {"c": ("job-3 2", "")}
    beats = [heartbeat("c", "job-3"), heartbeat("d", "x"), heartbeat("c", "job-4")]
    assert directives_for(beats, news, now_ms=0) == ([], [])
