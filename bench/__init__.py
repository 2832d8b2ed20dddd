"""Benchmarks of the proxy (issue 6): `make bench` runs them all; see bench/README.md."""
