"""Reading and writing Hugging Face safetensors checkpoints, lazily and positionally."""

from .format import DTYPES, FLOAT_DTYPES, TensorEntry
from .reader import Checkpoint, read_rows
from .writer import Placement, ShardLayout, write_rows

__all__ = ["DTYPES", "FLOAT_DTYPES", "TensorEntry", "Checkpoint", "read_rows", "Placement", "ShardLayout", "write_rows"]
