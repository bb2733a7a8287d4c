"""Test settings: CPU only, offline, no logger, tiny sizes."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not os.environ.get("HMRNN_TEST_CUDA"):  # CPU unless GPU checks are asked for explicitly
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # the Triton kernels run on CPU tensors through Triton's interpreter (read when they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _own_data_cache(tmp_path_factory):
    """Each test session builds its caches in its own folder (inherited by the subprocesses it
    starts), never in the user's cache directory, and two sessions running at once never share one."""
    previous = os.environ.get("HMRNN_CACHE_DIR")
    os.environ["HMRNN_CACHE_DIR"] = str(tmp_path_factory.mktemp("hmrnn-cache"))
    yield
    if previous is None:
        os.environ.pop("HMRNN_CACHE_DIR", None)
    else:
        os.environ["HMRNN_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def lm_ckpt(tmp_path_factory):
    """A real checkpoint written by `hmrnn fit` on the tiny quickstart (3 steps), shared by the
    session's tests, which only read it."""
    from hmrnn_lightning.cli import HMRNNCLI
    from tests.helpers import tiny

    root = tmp_path_factory.mktemp("lm")
    HMRNNCLI(args=["fit", *tiny(root, "--trainer.max_steps=3", "--trainer.limit_val_batches=1")])
    return next(root.rglob("last.ckpt"))
