import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# One intra-op thread: on a busy 2-core machine, two OpenMP threads per process spin
# against other processes and make CPU convolutions 40x slower; one thread stays fast.
torch.set_num_threads(1)
