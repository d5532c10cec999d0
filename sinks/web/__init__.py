"""The HTTP read side: the query API (and, next, the dashboard) over what the workers publish."""
