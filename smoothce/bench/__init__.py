"""Benchmarks of smoothce against PyTorch and other libraries: ``python -m smoothce.bench`` (see ``cli``),
``python -m smoothce.bench.linear`` (the fused linear loss) and ``python -m smoothce.bench.vocab_parallel``.
Importing this package imports nothing else.
"""
