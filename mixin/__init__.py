"""The monitoring mixin: one config from which alerts/ and grafana/ are generated."""
