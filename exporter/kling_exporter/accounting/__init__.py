"""Accounting: the ledger of tasks, usage and counters that the lines build, the record
of tasks it no longer indexes, its saved state, and the metrics it renders."""
