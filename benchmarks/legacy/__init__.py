"""The hand-written CPU kernels the rule engine replaced: kept for benchmarks/derived_vs_handwritten.py only."""
