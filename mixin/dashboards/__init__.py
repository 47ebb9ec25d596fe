"""The Grafana dashboards' source, as they are read: a module per dashboard (overview,
budgets), each a row at a time, built of the panel kinds in panels.py placed by
layout.py inside the envelope of board.py. knobs.py is what they take from the mixin's
config; files.py writes them to grafana/dashboards/."""
