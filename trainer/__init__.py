"""The training half of segnode: data, U-Net, training loop, evaluation, export and quantization.

This package's ``__init__`` and the modules :mod:`trainer.metrics`, :mod:`trainer.inference` and
:mod:`trainer.exceptions` import neither torch nor anything that does, so the node can use them.
"""
