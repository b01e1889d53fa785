"""Gateway: the one front door (validation, Redis queueing, routing, streaming, compile jobs)."""
