"""kling-exporter: Prometheus metrics and budget guard for Kling AI video generation."""

__version__ = "0.1.0"
