"""Reading and writing Hugging Face safetensors checkpoints, lazily and positionally."""

from .format import DTYPE_SIZES, FLOAT_DTYPES, TensorEntry
from .reader import Checkpoint, read_range, read_rows
from .writer import Placement, ShardLayout, write_rows

__all__ = ["DTYPE_SIZES", "FLOAT_DTYPES", "TensorEntry", "Checkpoint", "read_range", "read_rows", "Placement", "ShardLayout", "write_rows"]
