"""Benchmarks of charclip: training throughput of both backends, variants, scaling, and the cost of clipping.

Run everything with `python -m benchmarks` (or `--quick`); results land in benchmarks/results/<machine>/.
"""
