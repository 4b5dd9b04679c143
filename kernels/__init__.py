"""qtool's Triton kernels, installed as ``qtool.kernels`` (never as a top-level ``kernels`` package).

Nothing is imported eagerly: ``import qtool`` must not import Triton. Each module pairs a kernel with its
pure-PyTorch twin in ``qtool.reference`` (same arguments, same results):

- ``quant_4bit``: ``quantize_4bit`` / ``dequantize_4bit`` (NF4, FP4, blockwise absmax)
- ``double_quant``: ``quantize_absmax`` / ``dequantize_absmax`` (nested 8-bit absmax)
- ``quant_8bit``: ``quantize_8bit_rowwise`` / ``dequantize_8bit_rowwise`` (LLM.int8 weights)
- ``scale_search``: the searched absmax / SCB (``qtool.reference.scale_search``)
- ``matmul_4bit``: ``linear_4bit``, W4A16 for one row of x (``qtool.linear.linear_4bit_ref``)
- ``matmul_8bit``: ``int8_activations`` / ``linear_8bit``, LLM.int8 (``qtool.linear.int8_activations_ref`` /
  ``linear_8bit_ref``)
"""
