"""The training half of segnode: data, U-Net, training loop, evaluation, export and quantization.

This package's ``__init__`` and the modules :mod:`trainer.metrics`, :mod:`trainer.predictors`,
:mod:`trainer.evaluate` and :mod:`trainer.exceptions` import neither torch nor anything that does
(torch is imported only to run a checkpoint), so ONNX and IR models evaluate without it.
"""
