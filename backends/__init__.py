"""Framework adapters, installed as ``gradbridge.backends``: one folder per framework, with the same file names in
each (``adapter.py``, ``problem.py``, ``prepared.py``, ...), built on the adapter kit in ``common/``.

Each folder's package defines ``ADAPTER``, an object implementing :class:`gradbridge._adapter.Adapter`. They are
imported lazily by :mod:`gradbridge._registry`, never by ``import gradbridge``. ``docs/architecture.md`` says
what goes where.
"""
