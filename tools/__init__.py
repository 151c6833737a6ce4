"""Tools for working on the project (not shipped in the package)."""
