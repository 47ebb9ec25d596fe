"""Journals: appends on disk before anyone is told of them (group commit, atomic
files), the reservations' hold journal, and the task log that callbacks and the
gateway write among the logs."""
