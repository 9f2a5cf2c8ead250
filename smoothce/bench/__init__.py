"""Benchmarks of smoothce against PyTorch and other libraries: ``python -m smoothce.bench`` (see ``cli``)."""
