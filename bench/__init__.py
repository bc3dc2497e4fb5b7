"""Benchmarks (issue 6): `make bench` runs the CPU set (python -m bench), `python -m bench.gpu` the GPU one.

Benchmarks report; they never fail on a slow machine. Results go to bench/results/*.json (gitignored).
"""
