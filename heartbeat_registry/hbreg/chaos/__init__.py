"""`hbreg chaos`: the whole system under a fleet and a seeded schedule of faults, every request and outcome
recorded and checked against what the system promises (docs/reliability.md).

- faults.py: the schedule (what, where, when; seeded and printed, so a run can be repeated);
- toxiproxy.py: network faults through a real TCP fault proxy;
- system.py: every process, as a supervisor runs them, with the proxies in between;
- fleet.py: agents on the real client library, with faults of their own, recording every beat;
- probes.py: when each stage works again after a fault;
- verdict.py: the checks afterwards (availability, durability, detection, recovery);
- run.py: the soak itself and its JSON.
"""
