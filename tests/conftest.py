import gc

import pytest
import torch

# One intra-op thread: on a busy 2-core machine, two OpenMP threads per process spin
# against other processes and make CPU convolutions 40x slower; one thread stays fast.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The equivalence matrix first: it is most of the run's time, and with parallel workers
    (pytest-xdist, ``-n``) long tests started first keep the workers evenly loaded."""
    items.sort(key=lambda item: item.path.name != "test_equivalence.py")  # stable: keeps the rest in order


def pytest_collection_finish(session: pytest.Session) -> None:
    """Exempt what collection imported (torch, timm, Lightning: ~500k objects) from garbage
    collection, so that each ``gc.collect()`` a test makes to free a large network promptly
    costs microseconds instead of a quarter of a second."""
    gc.collect()
    gc.freeze()
