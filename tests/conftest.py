import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

from topocl.config import ModelConfig  # noqa: E402


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=32)
