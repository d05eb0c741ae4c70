"""The ``loraflow`` command line: one module per command group, one error mapping.

* :mod:`flows.cli.main`: the parser, logging set-up, and the one place that turns an
  error into an exit code (:class:`engine.errors.LoraflowError` carries its own);
* :mod:`flows.cli.train`: ``validate``, ``schema``, ``segment``, ``run``, ``retry``;
* :mod:`flows.cli.serve`: ``serve``, ``serve-segments``;
* :mod:`flows.cli.lora`: ``generate``, ``inspect``;
* :mod:`flows.cli.demo`: ``demo`` (a web page; the optional ``[demo]`` extra);
* :mod:`flows.cli.models`: ``tiny-model``, ``demo-data``;
* :mod:`flows.cli.bench`: ``bench``.

Building the parser imports no Prefect, torch or diffusers: each command imports what it
needs when it runs, so the commands a Crynux-style node runs (``segment``, ``validate``)
work in a process without Prefect. ``loraflow = "flows.cli:main"`` (pyproject.toml) and
``python -m flows.cli`` both start :func:`main`.
"""

from flows.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
