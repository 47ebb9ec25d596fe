"""Reading: the log files found and followed across rotation, their lines decoded and
applied to the ledger, in the reader process (the daemon and its end of the link)."""
