import pytest
import torch

from ddugm_core.checkpoints import DEFAULT_WEIGHTS, load_model, read_metadata, save_model
from ddugm_core.networks import NCSNpp, NetConfig, ScoreFunction


def test_network_shapes_and_sigma_scaling():
    net = NCSNpp(NetConfig(nf=8, ch_mult=(1, 2, 2), attn_resolutions=(8,), image_size=16))
    x = torch.randn(3, 2, 16, 16)
    out = net(x, torch.tensor([0.1, 1.0, 10.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_score_function_pads_any_size():
    score = ScoreFunction(NCSNpp(NetConfig(nf=8, ch_mult=(1, 2, 2), attn_resolutions=(), image_size=16)))
    x = torch.randn(2, 13, 22, dtype=torch.complex64)
    s = score(x, torch.tensor(0.5))
    assert s.shape == x.shape and s.dtype == torch.complex64


@pytest.mark.parametrize("sigma", [0.5, [0.1, 0.2, 0.3, 0.4, 0.5]])
def test_score_function_cpu_batches_give_the_whole_batch_result(sigma):
    """On a CPU the frames go through the network in batches of about chunk_pixels pixels
    (padded size): the same score as one call, one network call for the stage timer."""
    from ddugm_core.profiling import StageTimer

    net = NCSNpp(NetConfig(nf=8, ch_mult=(1, 2, 2), attn_resolutions=(8,), image_size=16))
    x = torch.randn(5, 13, 14, dtype=torch.complex64)
    sig = torch.tensor(sigma)
    whole = ScoreFunction(net, chunk_pixels=None)(x, sig)
    with StageTimer() as timer:
        parts = ScoreFunction(net, chunk_pixels=2 * 16 * 16)(x, sig)  # batches of 2, 2, 1
    assert torch.allclose(parts, whole, atol=1e-5)
    assert timer.calls["network"] == 1 and timer.items["network"] == 5


def test_keep_freed_memory_is_set_once_and_can_be_declined(monkeypatch):
    import sys

    from ddugm_core import reconstruction as r

    monkeypatch.setattr(r, "_MALLOC_TUNED", None)
    monkeypatch.setenv("DDUGM_KEEP_MEMORY", "0")
    assert r.keep_freed_memory() is False
    monkeypatch.delenv("DDUGM_KEEP_MEMORY")
    assert r.keep_freed_memory() is False  # decided once per process
    monkeypatch.setattr(r, "_MALLOC_TUNED", None)
    for k in [k for k in __import__("os").environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    glibc = sys.platform.startswith("linux") and __import__("platform").libc_ver()[0] == "glibc"
    assert r.keep_freed_memory() is glibc


def test_paper_configuration_is_constructible():
    cfg = NetConfig.paper()
    assert (cfg.nf, cfg.ch_mult, cfg.image_size) == (128, (1, 1, 2, 2, 2, 2, 2), 192)
    n = sum(p.numel() for p in NCSNpp(cfg).parameters())
    assert 30e6 < n < 120e6


def test_save_load_roundtrip(tmp_path):
    net = NCSNpp(NetConfig(nf=8, ch_mult=(1, 2), attn_resolutions=(), image_size=16))
    p = tmp_path / "m.safetensors"
    save_model(p, net, "kspace", {"steps": 3})
    back = load_model(p, expect_domain="kspace")
    x, s = torch.randn(2, 2, 16, 16), torch.tensor([0.3, 2.0])
    assert torch.allclose(back(x, s), net(x, s), atol=1e-6)
    with pytest.raises(ValueError, match="expected 'image'"):
        load_model(p, expect_domain="image")


def test_non_model_file_rejected(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(2)}, str(p))
    with pytest.raises(ValueError, match="not a DD-UGM score model"):
        load_model(p)
    for content in (b"# not weights\n" * 10, b"", b"\xff" * 64):  # any other file: one clear line, no traceback
        q = tmp_path / "weights.safetensors"
        q.write_bytes(content)
        with pytest.raises(ValueError, match="is not a safetensors file"):
            load_model(q)


@pytest.mark.parametrize("domain", ["image", "kspace", "xt"])
def test_shipped_weights(domain):
    path = DEFAULT_WEIGHTS[domain]
    assert path.stat().st_size < 25 * 2**20
    assert read_metadata(path)["domain"] == domain
    net = load_model(path, expect_domain=domain)
    assert sum(p.numel() for p in net.parameters()) > 0


def test_bf16_scores_stay_close_to_float32():
    """The shipped image model on noisy frames: bf16 autocast (emulated where the CPU lacks
    native bf16) stays within 2% of the float32 score, and the score is float32 either way."""
    from ddugm_core.networks import bf16_is_fast

    assert isinstance(bf16_is_fast(torch.device("cpu")), bool) and not bf16_is_fast(torch.device("meta"))
    assert not bf16_is_fast(torch.device("cuda"))  # measured slower than float32 for these networks on an H200
    net = load_model(DEFAULT_WEIGHTS["image"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 32, 32, generator=g, dtype=torch.complex64) * 0.2
    sigma = torch.tensor(0.2)
    ref = ScoreFunction(net)(x, sigma)
    low = ScoreFunction(net, amp=True)(x, sigma)
    assert low.dtype == torch.complex64
    err = float(torch.linalg.vector_norm(low - ref) / torch.linalg.vector_norm(ref))
    assert 0 < err < 0.02, err


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 4, 6, 10)])
def test_bf16_cpu_upsampling_is_the_fir_transposed_convolution(shape):
    """bf16 on a CPU upsamples by bilinear interpolation of the zero-padded input (oneDNN's bf16
    depthwise transposed convolution is 8 to 20 times slower): the same operator as the FIR
    transposed convolution, checked on bf16-representable inputs against float64."""
    from ddugm_core.networks import FIRResample

    up = FIRResample(True)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref = up(x.double())  # the transposed convolution
    got = up(x.contiguous(memory_format=torch.channels_last))
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape == shape[:2] + (2 * shape[2], 2 * shape[3])
    assert torch.allclose(got.double(), ref, rtol=1e-2, atol=1e-2)  # bf16's own rounding
    assert not torch.allclose(torch.zeros_like(ref), ref)
    # the edges: zero padding, not the clamping of plain bilinear interpolation
    assert torch.allclose(got[..., 0, 0].double(), 0.75 * 0.75 * x[..., 0, 0].double(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("nf", [12, 20, 24, 40, 48, 56, 80])
def test_networks_build_and_run_at_widths_that_are_not_powers_of_two(nf):
    net = NCSNpp(NetConfig(nf=nf, ch_mult=(1, 2, 2), attn_resolutions=(8,), image_size=16))
    x = torch.randn(2, 2, 16, 16)
    out = net(x, torch.tensor([0.1, 1.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    for m in net.modules():
        if isinstance(m, torch.nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0 and m.num_groups <= 32


def test_group_counts_unchanged_for_power_of_two_widths():
    from ddugm_core.networks import _groups

    for ch in (8, 16, 32, 64, 128, 256, 512, 96, 192):
        assert _groups(ch) == min(32, max(1, ch // 4))


def test_saved_models_are_readable_by_other_users(tmp_path):
    """A model file trained by one account must load in a server run by another (0644)."""
    path = tmp_path / "m.safetensors"
    save_model(path, NCSNpp(NetConfig(nf=8, ch_mult=(1, 2), attn_resolutions=(), image_size=16)), "image")
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("shape", [(27, 40), (26, 23), (9, 70)])
def test_tiled_attention_is_attention_within_each_tile(shape):
    """Each tile attends to its own pixels only, padded tiles included: the result equals global
    attention run on every tile cut out by hand."""
    import torch.nn.functional as F

    from ddugm_core.networks import _tiled_attention

    torch.manual_seed(0)
    c, window, (h, w) = 8, 16, shape
    qkv = torch.randn(2, 3 * c, h, w)
    out = _tiled_attention(qkv, window)
    ny, nx = max(1, round(h / window)), max(1, round(w / window))
    sy, sx = -(-h // ny), -(-w // nx)
    assert out.shape == (2, c, h, w) and (ny, nx) != (1, 1)
    for y0 in range(0, h, sy):
        for x0 in range(0, w, sx):
            tile = qkv[:, :, y0:y0 + sy, x0:x0 + sx]
            th, tw = tile.shape[-2:]
            q, k, v = tile.reshape(2, 3, c, th * tw).transpose(2, 3).unbind(1)
            ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, c, th, tw)
            torch.testing.assert_close(out[:, :, y0:y0 + th, x0:x0 + tw], ref, atol=1e-5, rtol=1e-5)


def test_windowed_attention_only_on_maps_larger_than_training():
    """At the training size (and smaller) windowed and global attention are the same network; on a
    larger frame they differ (tiles), and training code, which calls the network itself, keeps
    global attention. An unknown mode is refused by name."""
    from ddugm_core.networks import set_attention
    from ddugm_core.reconstruction import ReconConfig

    torch.manual_seed(0)
    net = NCSNpp(NetConfig(nf=8, image_size=32, attn_resolutions=(8,))).eval()
    for p in net.parameters():  # the attention projections start at zero: give them weights
        p.data.normal_(0, 0.05)
    s = torch.full((2,), 0.1)
    outs = {}
    for mode in ("global", "window"):
        set_attention(net, mode)
        with torch.no_grad():
            outs[mode] = [net(torch.randn(2, 2, *size, generator=torch.Generator().manual_seed(1)), s)
                          for size in ((32, 32), (24, 16), (96, 64))]
    for small_g, small_w in zip(outs["global"][:2], outs["window"][:2]):
        torch.testing.assert_close(small_w, small_g)
    assert not torch.allclose(outs["window"][2], outs["global"][2])
    assert not any(m.windowed for m in NCSNpp(NetConfig(nf=8)).modules() if hasattr(m, "windowed"))
    assert ScoreFunction(NCSNpp(NetConfig(nf=8))).net.mid[1].windowed is False
    with pytest.raises(ValueError, match="attention must be one of"):
        set_attention(net, "local")
    with pytest.raises(ValueError, match="attention must be one of"):
        ReconConfig.from_dict({"attention": "tiles"})
    assert ReconConfig().attention == "window"


def test_the_reconstructor_serves_its_attention_setting():
    from ddugm_core.reconstruction import ReconConfig, Reconstructor

    recs = {m: Reconstructor(ReconConfig.from_dict({"attention": m}), device="cpu") for m in ("window", "global")}
    assert recs["window"].model_key() != recs["global"].model_key()  # cached models are not shared across modes
    for mode, rec in recs.items():
        scores = rec.load_models()
        for domain, score in scores.items():  # the k-space prior saw whole k-spaces in training: always global
            blocks = [m for m in getattr(score, "score", score).net.modules() if hasattr(m, "windowed")]
            assert blocks and all(b.windowed == (mode == "window" and domain != "kspace") for b in blocks), domain


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiled_attention_and_the_noise_estimate_on_cuda_match_the_cpu():
    """The GPU kernels of masked attention (padded tiles) and of the coil eigenvalues give the
    CPU's numbers: the shipped image prior on a frame larger than its training crops, windowed."""
    from ddugm_core.checkpoints import load_model
    from ddugm_core.coils import estimate_noise_std
    from ddugm_core.masks import variable_density_mask
    from ddugm_core.networks import set_attention
    from ddugm_core.phantom import cine_phantom, coil_maps, simulate_kspace

    g = torch.Generator().manual_seed(0)
    x, s = torch.randn(2, 2, 104, 88, generator=g), torch.full((2,), 0.05)
    outs = []
    for dev in ("cpu", "cuda"):
        net = load_model(DEFAULT_WEIGHTS["image"], dev).eval()
        set_attention(net, "window")
        with torch.no_grad():
            outs.append(net(x.to(dev), s.to(dev)).cpu())
    torch.testing.assert_close(outs[1], outs[0], atol=1e-3 * float(outs[0].abs().max()), rtol=1e-3)
    mask = variable_density_mask(4, 48, 4, seed=0)
    k = torch.from_numpy(simulate_kspace(cine_phantom(4, 48, seed=2), coil_maps(10, 48), mask, noise=0.02, seed=1))
    m = torch.from_numpy(mask)
    assert estimate_noise_std(k.cuda(), m.cuda()) == pytest.approx(estimate_noise_std(k, m), rel=1e-4)
