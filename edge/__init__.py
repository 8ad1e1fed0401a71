"""edge: shared core (numpy + stdlib only) used by the exporter and the embedded runtime."""

__version__ = "0.1.0"
