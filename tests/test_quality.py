"""What makes pseudo-healthy images hold up: fp32 metrics, a gain-following generator, the
mask-aware output, the cycle's stopped gradient, and healthy tissue left alone after training."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytest
import torch
from conftest import compose_config, tiny_config
from hydra.errors import InstantiationException

from phs import metrics
from phs.methods.proposed import dilate
from phs.nets import ResnetGenerator
from phs.train import train


def _pair(seed: int = 0, shape: tuple[int, int] = (104, 80)) -> tuple[torch.Tensor, ...]:
    """A smooth 'brain' image, a near copy of it and a lesion mask."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, shape[0]), torch.linspace(-1, 1, shape[1]), indexing="ij"
    )
    brain = ((yy / 0.9) ** 2 + (xx / 0.8) ** 2 <= 1).float()
    x = brain * (0.5 + 0.2 * torch.sin(6 * yy) * torch.cos(5 * xx))
    x = x + brain * 0.05 * torch.rand(shape, generator=g)
    y = (x + brain * 0.01 * torch.randn(shape, generator=g)).clamp(0, 1)
    m = (((yy - 0.2) / 0.2) ** 2 + ((xx + 0.1) / 0.25) ** 2 <= 1).float()
    return (
        x[None, None].repeat(3, 1, 1, 1),
        y[None, None].repeat(3, 1, 1, 1),
        m[None, None].repeat(3, 1, 1, 1),
    )


def test_metrics_are_fp32_under_autocast() -> None:
    """bf16 autocast (the test stage under bf16-mixed) must not change any metric."""
    x, y, m = _pair()
    plain = {
        "identity": metrics.identity(y, x, m),
        **metrics.ground_truth_metrics(y, x, m, y),
        "dice": metrics.dice(y, m),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = {
            "identity": metrics.identity(y, x, m),
            **metrics.ground_truth_metrics(y, x, m, y),
            "dice": metrics.dice(y, m),
        }
        also_bf16_inputs = metrics.identity(y.bfloat16(), x.bfloat16(), m)
    for k in plain:
        assert auto[k].dtype == torch.float32, k
        torch.testing.assert_close(auto[k], plain[k], rtol=0, atol=1e-6, msg=k)
    assert (plain["identity"] <= 1.0).all() and (plain["identity"] > 0.9).all()
    assert (also_bf16_inputs <= 1.0 + 1e-6).all()


def test_identity_never_exceeds_one_for_near_copies() -> None:
    for seed in range(5):
        x, y, m = _pair(seed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert float(metrics.identity(y, x, m).max()) <= 1.0


def _gain_ratio(net: torch.nn.Module, x: torch.Tensor, gain: float = 0.6) -> float:
    brain = x > 0
    with torch.no_grad():
        return float(net(gain * x)[brain].mean() / net(x)[brain].mean())


def test_skip_generator_follows_a_global_gain_and_the_plain_one_does_not() -> None:
    """The plain generator normalises its first features per image, so it cannot see brightness:
    G(0.6 x) == G(x). With the skip its output follows the input's gain."""
    x = _pair()[0][:1]
    torch.manual_seed(0)
    plain = ResnetGenerator(features=8, n_res=2, skip=False).eval()
    torch.manual_seed(0)
    skip = ResnetGenerator(features=8, n_res=2, skip=True).eval()
    assert abs(_gain_ratio(plain, x) - 1.0) < 0.02
    assert abs(_gain_ratio(skip, x) - 0.6) < 0.08


def test_bilinear_upsampling_keeps_the_parameters_and_changes_the_decoder() -> None:
    """``upsample=bilinear`` keeps the parameter names (a state dict loads either way) and,
    with the same weights, computes a different decoder; an unknown mode is an error."""
    torch.manual_seed(0)
    nearest = ResnetGenerator(features=8, n_res=1, skip=True).eval()
    bilinear = ResnetGenerator(features=8, n_res=1, skip=True, upsample="bilinear").eval()
    bilinear.load_state_dict(nearest.state_dict())  # strict: the same names and shapes
    x = _pair()[0][:1]
    with torch.no_grad():
        a, b = nearest(x), bilinear(x)
    assert a.shape == b.shape == x.shape
    assert float((a - b).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="upsample"):
        ResnetGenerator(upsample="bicubic")


def test_the_default_inpainting_generator_follows_a_global_gain(tmp_path: Path) -> None:
    """The chosen G (skip, inpainting input): a brain 0.6 as bright comes back 0.6 as bright."""
    from phs.methods.proposed import inpaint_input

    model = hydra.utils.instantiate(tiny_config(tmp_path, None).model).eval()
    assert model.inpaint and model.G.skip
    x, _, m = _pair()
    x, w = x[:1], m[:1]

    def g(image: torch.Tensor) -> torch.Tensor:
        return model.G(torch.cat(inpaint_input(image, w), 1))

    assert abs(_gain_ratio(g, x) - 0.6) < 0.08


def test_mask_blend_keeps_the_input_where_s_sees_no_pathology(tmp_path: Path) -> None:
    # the region's geometry; G's input there (options.inpaint) is tested below
    cfg = tiny_config(tmp_path, None, "options.mask_blend=true", "options.inpaint=false")
    model = hydra.utils.instantiate(cfg.model).eval()
    x = _pair(shape=(48, 40))[0]
    with torch.no_grad():
        model.S.head.bias.fill_(-30.0)  # S: nothing anywhere -> the input itself
        torch.testing.assert_close(model.synthesize(x)["pseudo_healthy"], x, atol=1e-6, rtol=0)
        model.S.head.bias.fill_(30.0)  # S: pathology everywhere -> G's image
        torch.testing.assert_close(
            model.synthesize(x)["pseudo_healthy"], model.G(x), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("model_name", ["proposed_paired", "cyclegan"])
def test_infer_keeps_the_background(tmp_path: Path, model_name: str) -> None:
    """What is scored, shown and written is 0 outside the brain even where G paints there (a
    region past the brain's edge); inside the brain it is ``synthesize`` unchanged."""
    cfg = tiny_config(tmp_path, None, f"model={model_name}")
    model = hydra.utils.instantiate(cfg.model).eval()
    x = _pair(shape=(48, 40))[0]
    background = x == 0
    assert background.any() and (~background).any()
    if model_name == "proposed_paired":
        model.S.head.bias.data.fill_(30.0)  # S: pathology everywhere, background included
    raw, out = model.synthesize(x), model.infer(x)
    assert raw["pseudo_healthy"][background].abs().max() > 1e-3  # the raw output paints it
    for name, value in out.items():
        assert value[background].abs().max() == 0, name
        torch.testing.assert_close(value[~background], raw[name][~background], msg=name)


@pytest.mark.parametrize("detach", [False, True])
def test_cycle_gradient_into_g_inside_the_lesion(tmp_path: Path, detach: bool) -> None:
    """With cycle_detach_lesion, L_CC sends no gradient into G(x_p) inside the true lesion."""
    cfg = tiny_config(tmp_path, None, f"options.cycle_detach_lesion={detach}")
    model = hydra.utils.instantiate(cfg.model)
    x, _, m = _pair(shape=(48, 40))
    batch = {"x_p": x, "m_p": m, "x_h": x.flip(-1)}
    x_ph = torch.rand_like(x).requires_grad_()
    model.G = _Fixed(x_ph)  # this G(x_p) tensor comes back, so its gradient can be read
    c = model.fakes(batch)
    cc_ph = model.generator_loss(batch, c)["cc_ph"]
    (grad,) = torch.autograd.grad(cc_ph, x_ph, retain_graph=True)
    inside, outside = grad[m > 0.5].abs().sum(), grad[m < 0.5].abs().sum()
    assert outside > 0
    assert (inside == 0) if detach else (inside > 0)


@pytest.mark.parametrize("detach", [True, "region"])
def test_cycle_gradient_into_g_in_the_blend_ring(tmp_path: Path, detach: bool | str) -> None:
    """``cycle_detach_lesion=region`` also stops L_CC's gradient into G(x_p) in the ring that
    the blend's closing and dilation add around the lesion; ``true`` stops it in the lesion only."""
    cfg = tiny_config(tmp_path, None, f"options.cycle_detach_lesion={detach}")
    model = hydra.utils.instantiate(cfg.model)
    assert model.mask_blend and model.blend_dilate > 0
    x, _, m = _pair(shape=(48, 40))
    batch = {"x_p": x, "m_p": m, "x_h": x.flip(-1), "m_real": m.flip(-2)}
    model.S = _Constant(m[:1])  # S marks the true lesion: the blend region is it, grown
    x_ph = torch.rand_like(x).requires_grad_()
    model.G = _Fixed(x_ph)
    c = model.fakes(batch)
    (grad,) = torch.autograd.grad(model.generator_loss(batch, c)["cc_ph"], x_ph)
    ring = (c["w_ph"] > 0.999) & (m < 0.5)
    assert ring.any() and grad[m > 0.5].abs().sum() == 0
    assert (grad[ring].abs().sum() == 0) == (detach == "region")
    with pytest.raises(InstantiationException, match="cycle_detach_lesion must be"):
        hydra.utils.instantiate(
            tiny_config(tmp_path, None, "options.cycle_detach_lesion=ring").model
        )


@pytest.mark.parametrize("hh_region", ["s", "mask"])
def test_hh_region_is_where_g_repaints_in_cycle_hh(tmp_path: Path, hh_region: str) -> None:
    """In cycle H-H, G repaints S's region of R's lesion (``s``) or the H-H mask's own blend
    region (``mask``): with S seeing nothing, only ``mask`` changes R's output there."""
    cfg = tiny_config(tmp_path, None, f"options.hh_region={hh_region}")
    model = hydra.utils.instantiate(cfg.model)
    assert model.hh_masks == "real" and model.mask_blend
    x, _, m = _pair(shape=(48, 40))
    batch = {"x_p": x, "m_p": m, "x_h": x.flip(-1), "m_real": m.flip(-2)}
    model.S = _Constant(torch.zeros_like(m[:1]))  # S finds no lesion anywhere
    with torch.no_grad():
        c = model.fakes(batch)
    changed = (c["x_hh_rec"] - c["x_hh"]).abs() > 1e-6
    region = model.blend_region(batch["m_real"]) > 0
    assert not changed[~region].any()  # never outside the mask's region
    assert changed[region].any() == (hh_region == "mask")


@pytest.mark.parametrize("grow", [None, 0, 1])
def test_hh_render_dilate_keeps_r_lesion_within_the_mask(tmp_path: Path, grow: int | None) -> None:
    """``hh_render_dilate``: cycle H-H's image is R's rendering inside the H-H mask grown by that
    many pixels and x_h itself beyond it; unset, R changes pixels past the mask too."""
    value = "null" if grow is None else grow
    model = hydra.utils.instantiate(
        tiny_config(tmp_path, None, f"options.hh_render_dilate={value}").model
    )
    x, _, m = _pair(shape=(48, 40))
    batch = {"x_p": x, "m_p": m, "x_h": x.flip(-1), "m_real": m.flip(-2)}
    with torch.no_grad():
        c = model.fakes(batch)
    changed = (c["x_hh"] - batch["x_h"]).abs() > 1e-6
    near = dilate(batch["m_real"], 0 if grow is None else grow) > 0
    assert changed[near].any()
    assert changed[~near].any() == (grow is None)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["options.hh_render_dilate=-1"], "hh_render_dilate needs"),
        (["options.hh_render_dilate=1", "options.hh_masks=empty"], "hh_render_dilate needs"),
        (["options.hh_region=true"], "hh_region must be 's' or 'mask'"),
        (["options.hh_region=mask", "options.hh_masks=empty"], "hh_region=mask needs"),
        (["options.cycle_mask=open"], "cycle_mask must be 's' or 'closed'"),
        (["options.cycle_mask=closed", "options.blend_close=0"], "cycle_mask=closed needs"),
        (["model=proposed_unpaired", "options.mask_gan_ramp=[1.0,500]"], "mask_gan_ramp must be"),
        (["model=proposed_unpaired", "options.mask_gan_ramp=[1.0,9,5]"], "mask_gan_ramp must be"),
        (["model=proposed_unpaired", "options.mask_gan_ramp=[-1,0,5]"], "mask_gan_ramp must be"),
        (["model=proposed_unpaired", "options.mask_gan_ramp=[1,a,5]"], "mask_gan_ramp must be"),
        (["options.seg_loss=focal"], "seg_loss must be one of dice, dice_bce, tversky_bce"),
        (["options.outside_identity=-1"], "outside_identity needs"),
        (
            ["options.outside_identity=1", "options.mask_blend=false", "options.inpaint=false"],
            "outside_identity needs",
        ),
    ],
)
def test_cycle_option_values_are_checked(tmp_path: Path, overrides: list[str], match: str) -> None:
    with pytest.raises(InstantiationException, match=match):
        hydra.utils.instantiate(tiny_config(tmp_path, None, *overrides).model)


@pytest.mark.parametrize("model_name", ["proposed_paired", "proposed_unpaired"])
@pytest.mark.parametrize("cycle_mask", ["s", "closed"])
def test_cycle_mask_is_what_r_rebuilds_from(
    tmp_path: Path, model_name: str, cycle_mask: str
) -> None:
    """In cycle P-H (and at inference) R gets S's mask (``s``) or S's mask closed (``closed``):
    a core S leaves out of the lesion is lesion to R only with ``closed``."""
    cfg = tiny_config(tmp_path, None, f"model={model_name}", f"options.cycle_mask={cycle_mask}")
    model = hydra.utils.instantiate(cfg.model)
    x, _, m = _pair(shape=(48, 40))
    yy, xx = torch.nonzero(m[0, 0], as_tuple=True)
    cy, cx = int(yy.float().mean()), int(xx.float().mean())
    core = torch.zeros_like(m[:1])
    core[..., cy - 1 : cy + 2, cx - 1 : cx + 2] = 1
    model.S = _Constant(m[:1] * (1 - core))  # S leaves a 3 x 3 core out
    seen: list[torch.Tensor] = []
    model.R = _Capture(seen)
    batch = {"x_p": x, "m_p": m, "x_h": x.flip(-1), "m_real": m.flip(-2)}
    with torch.no_grad():
        model.fakes(batch)  # R's first call: cycle P-H
        model.synthesize(x)  # the reconstruction
    for r_in in (seen[0], seen[-1]):
        got, inside = r_in[:, 1:], core[0, 0] > 0
        assert (got[..., inside] == float(cycle_mask == "closed")).all()  # the core: 1 or 0
        assert not got[..., m[0, 0] < 0.5].any()  # nothing added outside the lesion


@pytest.mark.parametrize("fill_dilate", [None, 0])
def test_fill_dilate_shows_g_the_ring_it_repaints(tmp_path: Path, fill_dilate: int | None) -> None:
    """``fill_dilate=0``: G's input is filled only in S's closed mask, and G sees the tissue of
    the ring the blend's dilation adds; null fills the whole blend region. G's output replaces
    the input in the whole blend region either way."""
    cfg = tiny_config(tmp_path, None, f"options.fill_dilate={'null' if fill_dilate is None else 0}")
    model = hydra.utils.instantiate(cfg.model)
    assert model.inpaint and model.blend_dilate > 0
    x, _, m = _pair(shape=(48, 40))
    model.S = _Constant(m[:1])
    seen = []
    model.G = _Capture(seen)
    with torch.no_grad():
        _, _, w = model.factorize_with_region(x)
    filled, region = seen[0][:, :1], seen[0][:, 1:]
    ring = (w > 0.999) & (model.blend_region(m, 0) < 0.5)
    assert ring.any()
    assert torch.equal(filled[ring] == x[ring], torch.full_like(x[ring], fill_dilate == 0).bool())
    assert (region[ring] == 0).all() == (fill_dilate == 0)
    assert not (filled[m > 0.5] == x[m > 0.5]).all()  # the lesion itself is always filled


class _Capture(torch.nn.Module):
    """Records its input and returns its image channel."""

    def __init__(self, seen: list) -> None:
        super().__init__()
        self.seen = seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return x[:, :1]


class _Fixed(torch.nn.Module):
    """Returns a given tensor for the first call, then its input image (channel 0)."""

    def __init__(self, first: torch.Tensor) -> None:
        super().__init__()
        self.first = first
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.first if self.calls == 1 else x[:, :1]


def test_short_training_leaves_healthy_tissue_close_to_the_truth(tmp_path: Path) -> None:
    """A tiny proposed (paired) model at the defaults, 300 steps on a 6-volume phantom: healthy
    tissue of the test volumes comes back close to the true healthy image (PSNR outside the
    lesion), and the lesion moves towards the truth."""
    cfg = tiny_config(
        tmp_path,
        None,
        f"data.root={tmp_path / 'ph'}",  # data=synthetic_brats, the default: generated here
        "data.phantom.n_volumes=6",
        "data.preprocess.spacing=[4.0,4.0,4.0]",  # conf/debug/fast.yaml's slices
        "data.preprocess.slice_size=[48,40]",
        "data.preprocess.n_slices=8",
        "data.split.test_fraction=0.34",
        "trainer.max_steps=300",
        "trainer.precision=auto",  # experiment=demo's
    )
    train(cfg)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    print({k: round(v["mean"], 3) for k, v in m.items() if v["mean"] is not None})
    # seeds 10-13, at 1 thread (an xdist worker's, as CI runs it): 36.5-38.5 dB outside, the
    # lesion +3.2 to +4.5 dB over the input; at 2 threads (plain pytest on 2 cores): 27.2-36.3 dB,
    # +0.8 to +6.7 dB. The paper's settings (gain-blind G, no mask-aware output) gave 13.7 dB
    # outside at 1 thread (14.0 at 2; seed 10). A tiny run is chaotic (the thread count changes
    # its trajectory): the bars sit below every measured seed, and far above the paper's settings.
    assert m["psnr_outside"]["mean"] > 25.0
    assert m["psnr_lesion"]["mean"] > m["psnr_lesion_input"]["mean"]


@pytest.mark.parametrize("hh_masks", ["empty", "real"])
def test_hh_cycle_mask_and_what_d_x_judges(tmp_path: Path, hh_masks: str) -> None:
    """hh_masks=real: R gets a real mask from another volume in cycle H-H, G and S must undo it,
    and R's output (now pathological) is no longer shown to D_x as a would-be healthy image."""
    cfg = tiny_config(tmp_path, None, f"options.hh_masks={hh_masks}")
    model = hydra.utils.instantiate(cfg.model)
    x, _, m = _pair(shape=(48, 40))
    batch = {"x_p": x, "m_p": m, "x_h": x.flip(-1), "m_real": m.flip(-2)}
    seen, judged = [], []
    model.R.register_forward_hook(lambda mod, inp, out: seen.append(inp[0][:, 1].detach()))
    model.D_x.register_forward_hook(lambda mod, inp, out: judged.append(inp[0]))
    c = model.fakes(batch)
    want = batch["m_real"][:, 0] if hh_masks == "real" else torch.zeros_like(x[:, 0])
    assert torch.equal(seen[1], want)
    model.generator_loss(batch, c)
    assert len(judged) == (1 if hh_masks == "real" else 2)
    assert c["x_hh_rec"].requires_grad


def test_blend_dilate_repaints_the_border_and_fills_small_holes(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path, None, "options.mask_blend=true", "options.blend_dilate=1", "options.inpaint=false"
    )
    model = hydra.utils.instantiate(cfg.model).eval()
    mask = torch.zeros(1, 1, 48, 40)
    mask[..., 10:20, 10:20] = 1.0
    mask[..., 15, 15] = 0.0  # a one-pixel hole
    model.S = _Constant(mask)
    x = _pair(shape=(48, 40))[0][:1]
    with torch.no_grad():
        out, g = model.synthesize(x)["pseudo_healthy"], model.G(x)
    region = torch.zeros_like(mask, dtype=torch.bool)
    region[..., 9:21, 9:21] = True  # the square grown by one pixel, hole filled
    torch.testing.assert_close(out[region], g[region])
    torch.testing.assert_close(out[~region], x[~region])


def test_blend_close_fills_a_core_s_leaves_out(tmp_path: Path) -> None:
    """A ring-shaped mask (S misses a dark core): closing fills the core, keeps the outline."""
    cfg = tiny_config(
        tmp_path,
        None,
        "options.mask_blend=true",
        "options.blend_dilate=0",
        "options.blend_close=4",
        "options.inpaint=false",
    )
    model = hydra.utils.instantiate(cfg.model).eval()
    mask = torch.zeros(1, 1, 48, 40)
    mask[..., 10:26, 10:26] = 1.0
    mask[..., 14:22, 14:22] = 0.0  # an 8-pixel core left out
    model.S = _Constant(mask)
    x = _pair(shape=(48, 40))[0][:1]
    with torch.no_grad():
        out, g = model.synthesize(x)["pseudo_healthy"], model.G(x)
    region = torch.zeros_like(mask, dtype=torch.bool)
    region[..., 10:26, 10:26] = True  # the square with its core: nothing outside it
    torch.testing.assert_close(out[region], g[region])
    torch.testing.assert_close(out[~region], x[~region])


@pytest.mark.parametrize("r", [0, 1, 2, 4])
def test_dilate_is_the_square_max_filter(r: int) -> None:
    """The separable dilation takes, at every pixel, the max over the (2r+1)^2 square around it
    (clipped at the image's edge), on a soft mask with lesions touching the edges."""

    w = torch.rand(2, 1, 23, 17) * (torch.rand(2, 1, 23, 17) > 0.9)
    w[0, 0, 0, 0], w[1, 0, -1, 5] = 1.0, 0.7
    out = dilate(w, r)
    want = torch.empty_like(w)
    for i in range(w.shape[-2]):
        for j in range(w.shape[-1]):
            patch = w[..., max(i - r, 0) : i + r + 1, max(j - r, 0) : j + r + 1]
            want[..., i, j] = patch.amax((-2, -1))
    assert torch.equal(out, want)


class _Constant(torch.nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(len(x), -1, -1, -1)


@pytest.mark.parametrize(
    "experiment", ["paper", "paper_brats_paired", "paper_isles_unpaired", "paper_brats_cgan"]
)
def test_experiment_paper_is_the_paper_and_nothing_else(experiment: str) -> None:
    """One definition: every paper_* experiment gets the paper's settings from paper.yaml."""
    cfg = compose_config("train", f"experiment={experiment}")
    assert cfg.data.preprocess.normalize == "paper"
    assert list(cfg.data.preprocess.slice_size) == [208, 160] and cfg.data.preprocess.n_slices == 60
    assert (cfg.net.width, cfg.net.d_layers, cfg.net.skip, cfg.net.seg_dropout) == (
        32,
        4,
        False,
        0.3,
    )
    assert not cfg.options.mask_blend and not cfg.options.cycle_detach_lesion
    assert cfg.options.mask_gan_input == "soft"
    assert (cfg.options.seg_loss, cfg.options.hh_masks, cfg.options.blend_dilate) == (
        "dice",
        "empty",
        0,
    )
    assert cfg.model.optimizer.lr == 2e-4 and cfg.trainer.max_epochs == 300
    assert cfg.callbacks.ema is None  # the last step's weights, no averaging
    assert cfg.callbacks.lr_decay is None  # constant learning rates
    model = hydra.utils.instantiate(cfg.model)
    assert not model.G.skip
    if hasattr(model, "mask_blend"):
        assert not model.mask_blend and model.hh_masks == "empty" and not model.blend_in_brain
        assert not model.inpaint_in_brain
    if hasattr(model, "mask_gan_input"):
        assert model.mask_gan_input == "soft" and model.lambda_seg == 10.0  # lambda_3 = 10


def test_defaults_are_the_ablation_choice() -> None:
    cfg = compose_config("train")
    model = hydra.utils.instantiate(cfg.model)
    assert cfg.data.preprocess.normalize == "median" and model.G.skip and model.R.skip
    assert model.mask_blend and model.blend_dilate == 2 and model.cycle_detach_lesion
    assert model.blend_close == 4 and model.inpaint and model.hh_lesion_weight == 3  # ninth
    assert model.inpaint_fill == "texture"  # seventh screening (mirror not chosen in the sixth)
    assert model.hh_masks == "real" and model.seg_loss == "dice_bce"
    assert cfg.callbacks.ema._target_ == "phs.callbacks.EMA" and cfg.callbacks.ema.decay == 0.995
    unpaired = hydra.utils.instantiate(compose_config("train", "model=proposed_unpaired").model)
    assert unpaired.lambda_seg == 1.0 and unpaired.lambda_gan == 2.0  # sixth screening


def test_hh_lesion_term_is_the_mean_error_inside_the_mask(tmp_path: Path) -> None:
    """cc_hh_lesion averages G's H-H error over the mask's pixels and enters L_CC with its weight."""
    cfg = tiny_config(tmp_path, None, "options.hh_masks=real", "options.hh_lesion_weight=3")
    model = hydra.utils.instantiate(cfg.model)
    x_h = torch.full((2, 1, 16, 16), 0.4)
    m = torch.zeros_like(x_h)
    m[..., 4:8, 4:8] = 1.0  # 16 pixels per image
    rec = x_h.clone()
    rec[..., 4:8, 4:8] += 0.2  # the lesion left in: error 0.2 inside, 0 outside
    rec[..., 0, 0] += 0.5  # an error outside the mask: not in the lesion term
    batch = {"x_p": x_h, "x_h": x_h}
    c = {"x_rec": x_h, "x_hh_rec": rec, "m_hh_rec": m, "m_h": m}
    t = model.cycle_terms(batch, c)
    torch.testing.assert_close(t["cc_hh_lesion"], torch.tensor(0.2))
    plain = t["cc_ph"] + t["cc_hh_image"] + t["cc_hh_mask"]
    torch.testing.assert_close(t["cc"], plain + 3 * t["cc_hh_lesion"])
    # the paper's empty H-H masks: no lesion, so the term is 0 whatever its weight (the default
    # weight does not stop a user from switching to empty masks)
    empty = tiny_config(tmp_path, None, "options.hh_masks=empty", "options.hh_lesion_weight=3")
    model = hydra.utils.instantiate(empty.model)
    t = model.cycle_terms(batch, {**c, "m_h": torch.zeros_like(m)})
    assert float(t["cc_hh_lesion"]) == 0.0
    torch.testing.assert_close(t["cc"], t["cc_ph"] + t["cc_hh_image"] + t["cc_hh_mask"])


def test_outside_identity_pulls_g_to_its_input_outside_its_region(tmp_path: Path) -> None:
    """g_outside is G's own output's L1 to its input weighted by 1 - w (both cycles, averaged),
    enters L_CC with its weight, and trains G only: S's region and R's rendering are targets."""
    cfg = tiny_config(tmp_path, None, "options.outside_identity=2")
    model = hydra.utils.instantiate(cfg.model)
    x, _, m = _pair(shape=(48, 40))
    batch = {"x_p": x, "m_p": m, "x_h": x.flip(-1), "m_real": m.flip(-2)}
    c = model.fakes(batch)
    t = model.cycle_terms(batch, c)

    def weighted(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return ((g - x).abs() * (1 - w)).sum() / (1 - w).sum()

    expected = (weighted(c["g_ph"], x, c["w_ph"]) + weighted(c["g_hh"], c["x_hh"], c["w_hh"])) / 2
    torch.testing.assert_close(t["g_outside"], expected.detach(), check_dtype=False)
    assert float(t["g_outside"]) > 0 and float((1 - c["w_ph"]).sum()) > 0  # untrained S: w ~ 0.5
    plain = t["cc_ph"] + t["cc_hh_image"] + t["cc_hh_mask"] + 3.0 * t["cc_hh_lesion"]
    torch.testing.assert_close(t["cc"], plain + 2 * t["g_outside"])
    t["g_outside"].backward()
    grads = {
        name: sum(float(p.grad.abs().sum()) for p in net.parameters() if p.grad is not None)
        for name, net in (("G", model.G), ("S", model.S), ("R", model.R))
    }
    assert grads["G"] > 0 and grads["S"] == 0 and grads["R"] == 0
    # off (the default): logged, not in L_CC
    model = hydra.utils.instantiate(tiny_config(tmp_path, None).model)
    t = model.cycle_terms(batch, model.fakes(batch))
    assert float(t["g_outside"]) > 0
    torch.testing.assert_close(
        t["cc"], t["cc_ph"] + t["cc_hh_image"] + t["cc_hh_mask"] + 3.0 * t["cc_hh_lesion"]
    )


@pytest.mark.parametrize("mode", ["lsgan", "wgan_gp"])
def test_gan_region_scores_only_the_repainted_patches(mode: str) -> None:
    """options.gan_region: with the region everywhere the adversarial terms are the usual ones;
    only the patches that overlap the region count, and with no region the fake term is 0."""
    from phs.losses import Adversarial
    from phs.nets import PatchDiscriminator

    torch.manual_seed(0)
    adv, d = Adversarial(mode), PatchDiscriminator(in_channels=1, features=4, n_layers=2)
    real, fake = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    everywhere, nowhere = torch.ones_like(fake), torch.zeros_like(fake)
    s = d(fake).detach()
    torch.testing.assert_close(adv.generator(s, everywhere), adv.generator(s))
    assert float(adv.generator(s, nowhere)) == 0.0
    if mode == "lsgan":  # (the critic's gradient penalty is random)
        torch.testing.assert_close(
            adv.discriminator(d, real, fake, region=everywhere), adv.discriminator(d, real, fake)
        )
        only_real = 0.5 * ((d(real) - 1) ** 2).mean()
        torch.testing.assert_close(adv.discriminator(d, real, fake, region=nowhere), only_real)
    corner = nowhere.clone()
    corner[..., :8, :8] = 1.0  # a lesion in one corner: the far patches do not count
    s2 = s.clone()
    s2[..., -1, -1] += 5.0
    torch.testing.assert_close(adv.generator(s2, corner), adv.generator(s, corner))
    assert float(adv.generator(s2)) != float(adv.generator(s))


def test_mirror_fill_copies_the_other_hemisphere_where_it_is_healthy_brain() -> None:
    """options.inpaint_fill=mirror: the region gets the left-right mirrored pixels where those
    are brain outside the region, the brain's mean elsewhere; outside the region x is kept."""
    from phs.methods.proposed import inpaint_input

    x = torch.zeros(1, 1, 8, 8)
    x[..., 1:7, 1:7] = torch.linspace(0.2, 0.8, 36).reshape(6, 6)  # a brain, not symmetric
    w = torch.zeros_like(x)
    w[..., 2:4, 1:3] = 1.0  # the region, left side: its mirror (columns 5, 6) is brain
    w[..., 5, 3:5] = 1.0  # a region on the midline: its mirror is itself, so the mean
    filled, region = inpaint_input(x, w, "mirror")
    assert region is w
    torch.testing.assert_close(filled[..., 2:4, 1:3], x[..., 2:4, 5:7].flip(-1))
    around = (x > 0) & (w == 0)
    torch.testing.assert_close(filled[..., 5, 3:5], x[around].mean().expand(1, 1, 2))
    torch.testing.assert_close(filled[w == 0], x[w == 0])
    with pytest.raises(ValueError, match="mean.*mirror"):
        inpaint_input(x, w, "noise")


def test_aligned_mirror_finds_the_brains_own_midline() -> None:
    """A brain symmetric about a column off the image's centre: the plain flip misses it, the
    aligned mirror equals the image wherever both are usable."""
    from phs.methods.proposed import aligned_mirror

    torch.manual_seed(0)
    half = torch.rand(1, 1, 12, 6) + 0.2
    x = torch.zeros(1, 1, 12, 20)
    x[..., 3:9] = half
    x[..., 9:15] = half.flip(-1)  # symmetric about the line between columns 8 and 9 (centre: 9.5)
    usable = (x > 0).float()
    assert (x.flip(-1) - x).abs().max() > 0.1
    mirror, mirror_usable, shift = aligned_mirror(x, usable)
    assert shift.tolist() == [-2]  # the flip rolled back 2 columns: the midline 1 column left
    both = (usable * mirror_usable).bool()
    assert both.sum() == usable.sum()
    torch.testing.assert_close(mirror[both], x[both])


def test_texture_fill_keeps_fine_detail_but_not_large_structures() -> None:
    """options.inpaint_fill=texture: inside the region, the local brightness plus the mirrored
    fine detail (bounded by 15 % of the brain's mean); a large dark structure in the other
    hemisphere (a ventricle) is not copied; outside the region x is kept."""
    from phs.methods.proposed import inpaint_input

    h, wd = 40, 40
    cols = torch.arange(wd).float()
    stripes = 0.6 + 0.1 * torch.where(cols % 2 == 0, 1.0, -1.0)  # fine texture, sulci-like
    x = torch.zeros(1, 1, h, wd)
    x[..., 4:36, 4:36] = stripes[4:36]
    x[..., 16:24, 26:32] = 0.1  # a dark 'ventricle' on the right
    w = torch.zeros_like(x)
    w[..., 14:26, 7:15] = 1.0  # the region on the left, the ventricle's mirror image
    filled, _ = inpaint_input(x, w, "texture")
    inside = filled[w.bool()]
    assert inside.min() > 0.4  # no dark ventricle copied in (the mean fill is ~0.58)
    assert inside.std() > 0.03  # not flat: the stripes' detail is there
    around = (x > 0) & (w == 0)
    assert (inside - x[around].mean()).abs().max() <= 0.15 * x[around].mean() + 0.05
    torch.testing.assert_close(filled[w == 0], x[w == 0])
    flat, _ = inpaint_input(x, w, "mean")
    assert flat[w.bool()].std() < 1e-6
    with pytest.raises(ValueError, match="texture"):
        inpaint_input(x, w, "noise")


def test_texture_contrast_fill_follows_the_mirrored_regions_brightness() -> None:
    """options.inpaint_fill=texture_contrast: a region lying in darker tissue than the ring around
    it (a dark patch in both hemispheres) is filled with the mirrored patch's brightness, where the
    texture fill gives it the ring's; outside the region x is kept."""
    from phs.methods.proposed import inpaint_input

    x = torch.zeros(1, 1, 40, 40)
    x[..., 4:36, 4:36] = 0.7
    x[..., 14:26, 8:16] = 0.6  # darker tissue on the left ...
    x[..., 14:26, 24:32] = 0.6  # ... and its mirror image on the right
    w = torch.zeros_like(x)
    w[..., 14:26, 8:16] = 1.0  # the region: the left patch, as if it held a lesion
    inside = w.bool()
    texture, _ = inpaint_input(x, w, "texture")
    contrast, _ = inpaint_input(x, w, "texture_contrast")
    err_texture = (texture[inside] - 0.6).abs().mean()
    err_contrast = (contrast[inside] - 0.6).abs().mean()
    assert err_texture > 0.05  # the ring's brightness, too bright
    assert err_contrast < 0.7 * err_texture  # part of the way: the contrast is smoothed too
    torch.testing.assert_close(contrast[~inside], x[~inside])


def test_texture_trimmed_fill_ignores_a_dark_sulcus_in_the_ring() -> None:
    """options.inpaint_fill=texture_trimmed: a dark sulcus beside the region darkens the texture
    fill's local brightness (a smoothed mean of the ring); the trimmed fill leaves it out and
    fills the region with the ring's typical tissue; outside the region x is kept."""
    from phs.methods.proposed import inpaint_input

    x = torch.zeros(1, 1, 40, 40)
    x[..., 4:36, 4:36] = 0.6
    x[..., 12:28, 17:19] = 0.1  # a dark sulcus two pixels right of the region
    w = torch.zeros_like(x)
    w[..., 14:26, 9:15] = 1.0
    inside = w.bool()
    texture, _ = inpaint_input(x, w, "texture")
    trimmed, _ = inpaint_input(x, w, "texture_trimmed")
    err_texture = (texture[inside] - 0.6).abs().mean()
    err_trimmed = (trimmed[inside] - 0.6).abs().mean()
    assert err_texture > 0.03  # pulled towards the sulcus
    assert err_trimmed < 0.3 * err_texture
    torch.testing.assert_close(trimmed[~inside], x[~inside])
    flat = x.clone()
    flat[..., 12:28, 17:19] = 0.6  # no outlier in the ring: the two fills agree
    torch.testing.assert_close(
        inpaint_input(flat, w, "texture_trimmed")[0], inpaint_input(flat, w, "texture")[0]
    )


def test_inpaint_output_ignores_what_is_inside_the_region(tmp_path: Path) -> None:
    """With inpaint, G repaints the blend region from its surroundings: two images that differ
    only inside it (a bright lesion vs a dark core) get the same pseudo-healthy image."""
    cfg = tiny_config(
        tmp_path, None, "options.mask_blend=true", "options.inpaint=true", "options.blend_close=0"
    )
    model = hydra.utils.instantiate(cfg.model).eval()
    assert next(m for m in model.G.modules() if isinstance(m, torch.nn.Conv2d)).in_channels == 2
    mask = torch.zeros(1, 1, 48, 40)
    mask[..., 12:24, 12:24] = 1.0
    model.S = _Constant(mask)
    x = _pair(shape=(48, 40))[0][:1]
    bright, dark = x.clone(), x.clone()
    inside = torch.zeros_like(mask, dtype=torch.bool)
    inside[..., 10:26, 10:26] = True  # the region after the 2-pixel dilation
    bright[inside], dark[inside] = 0.9, 0.1
    with torch.no_grad():
        a, b = model.synthesize(bright)["pseudo_healthy"], model.synthesize(dark)["pseudo_healthy"]
    torch.testing.assert_close(a[inside], b[inside])
    torch.testing.assert_close(a[~inside], bright[~inside])
    assert not torch.allclose(a[inside], bright[inside])


def test_f_pre_dice_bce_adds_the_cross_entropy(tmp_path: Path) -> None:
    from phs.losses import bce

    cfg = tiny_config(tmp_path, None, "model=segmentor", "model.loss=dice_bce")
    model = hydra.utils.instantiate(cfg.model)
    m = torch.zeros(2, 1, 16, 16)
    m[0, :, 4:9, 4:9] = 1.0
    batch = {"x_p": torch.rand(2, 1, 16, 16), "x_h": torch.rand(2, 1, 16, 16), "m_p": m}
    f = model.fakes(batch)
    both = torch.cat([m, torch.zeros_like(m)])
    expected = model.dice(f["m"], both) + bce(f["m"], both)
    torch.testing.assert_close(model.generator_loss(batch, f)["loss"], expected)
    assert bce(f["m"], both) > 0


@pytest.mark.parametrize("seg_loss", ["dice_bce", "tversky_bce"])
def test_tversky_seg_loss_charges_a_missed_pixel_more_than_a_false_one(
    tmp_path: Path, seg_loss: str
) -> None:
    """L_Seg with ``tversky_bce``: a mask that misses 8 lesion pixels costs more than one that
    adds 8 false ones (``dice_bce``: the Dice parts are close); the BCE term is in both."""
    from phs.losses import bce

    model = hydra.utils.instantiate(
        tiny_config(tmp_path, None, f"options.seg_loss={seg_loss}").model
    )
    m = torch.zeros(1, 1, 16, 16)
    m[..., 4:12, 4:12] = 1.0
    missed, extra = m.clone(), m.clone()
    missed[..., 4, 4:12] = 0.0
    extra[..., 12, 4:12] = 1.0
    overlap = {
        k: model.segmentation_loss(p, {"m_p": m}) - bce(p, m)
        for k, p in (("missed", missed), ("extra", extra))
    }
    ratio = float(overlap["missed"] / overlap["extra"])  # Dice: 0.067 / 0.059; Tversky: 2.5
    assert ratio > 2.0 if seg_loss == "tversky_bce" else 1.0 < ratio < 1.3


def _brain_with_a_core() -> torch.Tensor:
    """A 32 x 32 slice whose brain is columns 4-19, with a black core at its right edge."""
    x = torch.zeros(1, 1, 32, 32)
    x[..., 4:28, 4:20] = 0.5
    x[..., 12:14, 16:18] = 0.0  # the core, inside the brain, at the lesion
    return x


def test_blend_in_brain_keeps_the_background(tmp_path: Path) -> None:
    """options.blend_in_brain: a lesion at the brain's edge is repainted inside the brain only;
    the background stays the input's zero, and a dark core inside the brain is still repainted."""
    cfg = tiny_config(
        tmp_path,
        None,
        "options.blend_in_brain=true",
        "options.inpaint=false",
        "options.blend_close=0",
    )
    model = hydra.utils.instantiate(cfg.model)
    x = _brain_with_a_core()
    mask = torch.zeros_like(x)
    mask[..., 10:16, 14:20] = 1.0  # a lesion at the brain's right edge
    g = torch.full_like(x, 0.9)
    model.S, model.G = _Constant(mask), _Constant(g)
    out, _ = model.factorize(x)
    background = x == 0
    background[..., 12:14, 16:18] = False
    assert out[background].abs().max() == 0  # nothing painted outside the brain
    torch.testing.assert_close(out[..., 12:14, 16:18], g[..., 12:14, 16:18])  # the core: repainted
    model.blend_in_brain = False  # without it the dilated region spills out of the brain
    out, _ = model.factorize(x)
    assert out[background].max() > 0


@pytest.mark.parametrize("fill", ["mean", "texture"])
def test_inpaint_in_brain_shows_g_the_brains_outline(tmp_path: Path, fill: str) -> None:
    """options.inpaint_in_brain: where the region reaches past the brain's edge, G's input keeps
    the background (zero) and fills only the brain part, dark core included; the region channel
    is the whole region, and G's output is still used over all of it."""
    cfg = tiny_config(
        tmp_path,
        None,
        "options.inpaint=true",
        "options.inpaint_in_brain=true",
        f"options.inpaint_fill={fill}",
        "options.blend_close=0",
        "options.blend_dilate=0",
    )
    model = hydra.utils.instantiate(cfg.model)
    x = _brain_with_a_core()
    mask = torch.zeros_like(x)
    mask[..., 10:16, 14:24] = 1.0  # a lesion region at the brain's right edge, past it
    seen = []
    g = torch.full_like(x, 0.9)

    class _Recording(torch.nn.Module):
        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            seen.append(inp)
            return g

    model.S, model.G = _Constant(mask), _Recording()
    out, _ = model.factorize(x)
    image, region = seen[-1].unbind(1)
    torch.testing.assert_close(region, mask[:, 0])
    assert image[..., 10:16, 20:24].abs().max() == 0  # the background part: left as background
    assert image[..., 12:14, 16:18].min() > 0.3  # the core inside the brain: filled
    torch.testing.assert_close(out[..., 10:16, 14:24], g[..., 10:16, 14:24])  # G's, all of it
    model.inpaint_in_brain = False  # without it the fill spills tissue into the background
    model.factorize(x)
    assert seen[-1][:, 0, 10:16, 20:24].min() > 0.3
    with pytest.raises(InstantiationException, match="inpaint_in_brain needs inpaint"):
        hydra.utils.instantiate(
            tiny_config(
                tmp_path, None, "options.inpaint=false", "options.inpaint_in_brain=true"
            ).model
        )


@pytest.mark.parametrize("mode", ["soft", "straight_through"])
def test_what_d_m_sees_of_s_masks(tmp_path: Path, mode: str) -> None:
    """options.mask_gan_input: D_m sees S's soft mask (the paper) or, straight-through, its
    binary version, whose gradient still reaches S."""
    cfg = tiny_config(tmp_path, None, "model=proposed_unpaired", f"options.mask_gan_input={mode}")
    model = hydra.utils.instantiate(cfg.model)
    x, _, m = _pair(shape=(48, 40))
    batch = {"x_p": x, "m_p": m, "x_h": x.flip(-1), "m_real": m.flip(-2)}
    seen = []
    model.D_m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    c = model.fakes(batch)
    gan2 = model.generator_loss(batch, c)["gan2"]
    d_in = seen[0]
    binary = ((d_in == 0) | (d_in == 1)).all()
    assert bool(binary) == (mode == "straight_through")
    (grad,) = torch.autograd.grad(gan2, c["m_ph"])
    assert grad.abs().sum() > 0
    model.discriminator_loss(batch, {k: v.detach() for k, v in c.items()})
    assert bool(((seen[-1] == 0) | (seen[-1] == 1)).all()) == (mode == "straight_through")


@pytest.mark.parametrize("ramp", [None, [1.0, 4, 8], [0.5, 6, 6]])
def test_mask_gan_ramp_schedules_lambda_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ramp: list[float] | None
) -> None:
    """options.mask_gan_ramp=[w, a, b]: lambda_3 is w until step a, then linear to
    mask_gan_weight at step b and after; without it lambda_3 is mask_gan_weight throughout. The
    weight is the one L_GAN2 enters the generators' loss with."""
    over = ["model=proposed_unpaired", "options.mask_gan_weight=3.0"]
    if ramp is not None:
        over.append(f"options.mask_gan_ramp=[{ramp[0]},{ramp[1]},{ramp[2]}]")
    model = hydra.utils.instantiate(tiny_config(tmp_path, None, *over).model)
    x, _, m = _pair(shape=(48, 40))
    batch = {"x_p": x, "m_p": m, "x_h": x.flip(-1), "m_real": m.flip(-2)}
    step = {"now": 0}  # the trainer's step counter, without a trainer
    monkeypatch.setattr(type(model), "global_step", property(lambda self: step["now"]))
    weights = []
    for step["now"] in range(12):
        weights.append(model.lambda_3())
    t = model.generator_loss(batch, model.fakes(batch))
    if ramp is None:
        assert weights == [3.0] * 12
    elif ramp[1] == ramp[2]:  # a step change at step 6
        assert weights == [0.5] * 6 + [3.0] * 6
    else:
        assert weights[:5] == [1.0] * 5 and weights[8:] == [3.0] * 4
        assert weights[5:8] == pytest.approx([1.5, 2.0, 2.5])
    expected = model.lambda_cc * t["cc"] + model.lambda_gan * t["gan1"] + weights[-1] * t["gan2"]
    assert torch.allclose(t["loss"], expected)
