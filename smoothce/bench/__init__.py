"""Benchmarks of smoothce against PyTorch and other libraries: ``python -m smoothce.bench``.

Modules, one job each: ``cli`` (options, presets, output folder), ``runner`` (the sweep),
``cases`` (shapes, dtypes, inputs, bytes moved), ``impls`` (the implementations and one
run), ``timing`` (do_bench on accelerators, perf_counter on CPU, interleaved rounds, the
copy and read limits), ``memory`` (peak memory beyond the logits), ``machine`` (the
environment), ``report`` (JSON and Markdown with the ratios), ``plots`` (PNGs),
``vocab_parallel`` (the vocabulary-parallel benchmark and its launcher). Importing this package imports nothing else.
"""
