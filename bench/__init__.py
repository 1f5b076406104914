"""Benchmarks: the registry measured beside etcd and beside the ceiling of its
own stack (an empty purerpc call). `just bench` or `python -m bench`; see
bench.runner for how a run goes and the README's "Benchmarks" section for
what it measures."""
