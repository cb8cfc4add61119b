import os

import pytest
import torch

# Tests never reach the network: the Hub resolver must fail fast and clearly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
