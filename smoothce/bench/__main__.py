"""``python -m smoothce.bench``: runs the benchmark command line (see ``smoothce.bench.cli``)."""

from smoothce.bench.cli import main

raise SystemExit(main())
