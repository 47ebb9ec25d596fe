"""The guard: reservations that hold what a pre-flight check granted, and the fleet
that shares budgets among exporters through Redis."""
