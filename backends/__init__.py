"""Framework adapters, installed as ``gradbridge.backends``: one module per framework.

Each module defines ``ADAPTER``, an object implementing :class:`gradbridge._adapter.Adapter`. They are
imported lazily by :mod:`gradbridge._registry`, never by ``import gradbridge``.
"""
