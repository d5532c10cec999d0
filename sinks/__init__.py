"""Consumers of `agent-events`: the reassignment sink and the Alertmanager sink (later issues)."""
