"""Benchmarks of fastbn, as ``cases -> measure -> rows -> render/plot -> targets -> cli``.

* :mod:`.cases` — shapes with their feature axis, dtypes, and the random inputs;
* :mod:`.registry` (passes of the functional API), :mod:`.layer` (the layer API at small
  training shapes), :mod:`.fused` (BN + ReLU (+ add)) — ``{operation: {implementation: setup}}``;
* :mod:`.timing`, :mod:`.roofline` (bytes per pass, bandwidth, the one bandwidth rule of both
  drivers), :mod:`.measure` (sections run into rows), :mod:`.stats` (speedup intervals);
* :mod:`.rows` — the ``Row`` dataclass and the JSON schema version;
* :mod:`.render`, :mod:`.plot` — console table, Markdown for the README, PNG chart;
* :mod:`.targets` — the performance targets, checked against a run's own rows;
* :mod:`.cli` — ``python -m fastbn bench``.

``pytest bench/ --benchmark-only`` runs the pytest-benchmark suite over the same pass registry.
"""
