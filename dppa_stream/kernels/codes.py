"""The kernels' integer codes, without numba: planners and config parsing name them at import."""

import numpy as np

# dtype codes: raw arrays are unsigned views of the stored bytes
BF16, F16, F32, F64 = 0, 1, 2, 3
CODES = {"BF16": BF16, "F16": F16, "F32": F32, "F64": F64}
CONTAINER = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32, "F64": np.uint64}

# threshold kinds: compare |x| with the value and keep the ties in a window, keep all, keep none,
# keep |x| > value
TH_VALUE, TH_ALL, TH_NONE, TH_GT = 0, 1, 2, 3

# sparsifier codes (`delta.MODEL_FIELDS` mode)
SP_NONE, SP_SHRINK, SP_BERNOULLI, SP_BANDS, SP_RANGE, SP_MASK = 0, 1, 2, 3, 4, 5
