"""Real-time availability of mitras: a gRPC service over Postgres (truth) and Valkey (mirror)."""

__version__ = "0.1.0"
