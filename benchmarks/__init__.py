"""Speed benchmarks of moedd against the reference code of each method (run ``benchmarks/bench.py``)."""
