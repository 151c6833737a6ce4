"""Real-time availability of mitras: a gRPC service over Postgres (truth) and Valkey (mirror)."""
