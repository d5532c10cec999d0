"""Every consumer of the pipeline's output: the HTTP read side (`web`: the query API), the reassignment
sink (`reassign`, with its policy in `reassign_policy`) and the reference Role Assignment service
(`assigner`). Sinks import the shared core, never `ingest/` or `processors/`."""
