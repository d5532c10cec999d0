"""The shared server-side core: what `ingest/`, `processors/`, `sinks/` and the `hbreg` tools agree on.

- `settings`: every `HBREG_*` variable, typed and validated once; `state`: what `hbreg up` records.
- `names`: every Redis key, Kafka topic and consumer group; `topics`: creating the topics.
- `columns`: heartbeats packed column-wise (Redis stream entries, Kafka records).
- `views` and `windowstats`: what the workers publish for readers, and the rules readers apply to it.
- `shapes`: the JSON of the CLI and the HTTP API; `events`: reading `agent-events`.
- `logs`, `lifecycle`, `health`: how every long-running process logs, starts, stops and reports.

Agents never import this package (`heartbeat_registry` itself stays free of the server stack).
"""
