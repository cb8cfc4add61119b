import os
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Tests never reach the network: the Hub resolver must fail fast and clearly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from tendiff.checkpoints import checkpoint_name, read_manifest  # noqa: E402

APP_NEEDS = ("classifier", "tt-r2")  # what the app tests run on (MNIST)


def missing_checkpoints(dataset: str = "mnist", models=APP_NEEDS) -> list[str]:
    """Checkpoint files of `models` that the committed manifest does not list."""
    listed = read_manifest()["checkpoints"]
    return [checkpoint_name(dataset, m) for m in models if checkpoint_name(dataset, m) not in listed]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def app_url():
    """The app, launched once per test session on a free local port (app tests, browser, load)."""
    if missing_checkpoints():
        pytest.skip(f"MNIST checkpoints not trained yet: {missing_checkpoints()}")
    import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                    **app.launch_kwargs())
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.demo.close()
