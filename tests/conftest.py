import os

import torch

# No GPU: run the Triton kernels in Triton's interpreter on CPU tensors. Must be set before
# anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
