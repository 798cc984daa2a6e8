import numpy as np
import pytest
import torch

from ddugm_core.checkpoints import save_model
from ddugm_core.networks import NCSNpp, NetConfig

torch.set_num_threads(2)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def crandn(rng, *shape):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """Tiny, untrained score models (fast) of each domain, saved as real model files."""
    d = tmp_path_factory.mktemp("weights")
    paths = {}
    for i, domain in enumerate(("image", "kspace", "xt")):
        torch.manual_seed(i)
        net = NCSNpp(NetConfig(nf=8, ch_mult=(1, 2), attn_resolutions=(), image_size=16))
        paths[domain] = d / f"{domain}.safetensors"
        save_model(paths[domain], net, domain)
    return paths


@pytest.fixture
def tiny_config(tiny_weights):
    from ddugm_core import ReconConfig

    return ReconConfig(image_weights=str(tiny_weights["image"]), kspace_weights=str(tiny_weights["kspace"]),
                       xt_weights=str(tiny_weights["xt"]),
                       steps=3, lowrank_iters=3, device="cpu")
