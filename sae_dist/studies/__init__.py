"""Studies: applications built on the library's public API, each with its own command."""
