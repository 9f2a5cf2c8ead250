"""Benchmarks of smoothce against PyTorch and other libraries: ``python -m smoothce.bench``.

Modules, one job each: ``cli`` (options, presets, output folder), ``runner`` (the
sweep and its progress bar), ``cases`` (shapes, dtypes, inputs, bytes moved),
``impls`` (the implementations and one timed run), ``timing`` (timers, the
interleaved loop, copy bandwidth), ``memory`` and ``_memprobe`` (peak memory beyond
the logits), ``machine`` (device, versions, date), ``report`` (JSON and Markdown
with the ratios), ``plots`` (PNGs). Importing this package imports nothing else.
"""
