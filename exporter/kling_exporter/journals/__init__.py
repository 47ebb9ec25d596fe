"""Journals: appends on disk before anyone is told of them (group commit, atomic
files), the reservations' hold journal, and the task log that callbacks and the
gateway write among the logs.

One rule for a tail a crash or a full disk tore: it never joins the next record. The
hold journal, which no one else reads, cuts it off; the task log, which the tailer may
have read up to the tear, ends it with a newline instead (a bad line, counted and
skipped), since taking back bytes already read would lose or repeat a line."""
