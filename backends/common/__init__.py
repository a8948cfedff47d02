"""The adapter kit: what every backend would otherwise copy, tested once and used by all of them.

``layout`` (checked leaves and the flat vector), ``outputs`` (output leaves), ``params`` (``params=`` as a
collection), ``rng`` (Python's and NumPy's generators pinned and restored), ``lowprec`` (checks in the user's own
low precision), ``handwritten`` (the ``grad=`` path on any framework), ``batching`` (one batched-vs-loop decision
per computation), ``reach`` (reading fn's code without running it), ``fingerprint``/``cache``/``state`` (what fn
reads, the weak per-function cache keyed by it, and the state a traced run rebinds). Nothing here imports a
framework; ``docs/architecture.md`` shows where the kit sits.
"""
