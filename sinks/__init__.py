"""Every consumer of the pipeline's output: the HTTP read side (`web`: query API, dashboard), and the
reassignment and Alertmanager sinks. Sinks import the shared core, never `processors/`."""
