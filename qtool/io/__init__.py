"""Checkpoint files in and out: the only part of qtool that imports ``safetensors``.

``reader`` scans a component folder from its safetensors headers and streams tensors one at a time; ``writer``
writes size-capped shards and their index with about one tensor in memory. Neither quantizes, resolves Hub repos
or touches ``config.json``: they move tensors between files and memory, nothing more.
"""

from qtool.io.reader import ComponentWeights, TensorInfo, TensorReader, safetensors_header, scan_component
from qtool.io.writer import ShardedWriter

__all__ = [
    "ComponentWeights",
    "ShardedWriter",
    "TensorInfo",
    "TensorReader",
    "safetensors_header",
    "scan_component",
]
