"""Serving replica: loads builds of one hardware pool, hot-swaps them, streams tokens."""
