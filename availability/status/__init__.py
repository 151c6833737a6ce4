"""`availability status`: what on-call types first. It asks the deployment itself, not one
process's memory: the server's health and beacon over gRPC, what every instance reported in
Valkey in the last seconds, each sweep's lease and last run, Postgres's own view, and the
drift between the two stores. Every problem it finds is one line pointing at the runbook.

The report gathers and judges, the text lays it out for a person, the live view redraws it
with what moves."""

from .live import watch
from .report import gather
from .text import render

__all__ = ["gather", "render", "watch"]
