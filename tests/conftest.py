"""Test configuration.

Without an NVIDIA driver the CUDA kernels run in Numba's CUDA simulator; the switch must be set
before anything imports numba.cuda, so it lives here, ahead of every test module.
"""

import os
import shutil

if not (shutil.which("nvidia-smi") or os.path.exists("/dev/nvidiactl")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
