"""The guidance slider and the plain function behind it; image grids; the class-conditional MLP."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from course.nets import TimeMLP  # noqa: E402
from course.plotting import plot_images  # noqa: E402
from course.recipes import sample_classes  # noqa: E402
from course.unet import UNet  # noqa: E402
from course.widgets import (  # noqa: E402
    InteractiveFigure,
    cfg_samples,
    figure_png,
    guidance_slider,
    interactive_figure,
    png_title,
)


def _unet():
    torch.manual_seed(0)
    net = UNet(1, channels=(8, 8, 8), num_classes=10, groups=4, patch=2)
    with torch.no_grad():  # random weights everywhere (the output layer starts at zero): labels must matter
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    return net.eval()


def test_cfg_samples_are_the_seeded_guided_sampler():
    net = _unet()
    got = cfg_samples(net, 2.0, classes=[3, 7], per_class=2, nfe=3, seed=5)
    ref = sample_classes(net, torch.tensor([3, 3, 7, 7]), w=2.0, nfe=3, generator=torch.Generator().manual_seed(5))
    assert got.shape == (4, 1, 28, 28) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_cfg_samples_share_the_noise_across_w():
    net = _unet()
    a = cfg_samples(net, 0.0, classes=[1], per_class=3, nfe=1, seed=0)
    b = cfg_samples(net, 4.0, classes=[1], per_class=3, nfe=1, seed=0)
    # one Euler step from t = 1: x = x1 - v(x1, 1); the same x1 for both weights
    x1 = torch.randn((3, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    y, null = torch.ones(3, dtype=torch.long), torch.full((3,), 10)
    t = torch.ones(3)
    with torch.no_grad():
        cond, uncond = net(x1, t, y=y), net(x1, t, y=null)
    torch.testing.assert_close(a, x1 - cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, x1 - (5 * cond - 4 * uncond), rtol=1e-5, atol=1e-5)
    assert (a - b).abs().max() > 1e-3


def test_cfg_samples_errors():
    net = _unet()
    with pytest.raises(ValueError, match="w >= 0"):
        cfg_samples(net, -1.0, per_class=1, nfe=1)
    with pytest.raises(ValueError, match="at least one class"):
        cfg_samples(net, 1.0, classes=[], nfe=1)
    with pytest.raises(ValueError, match="per_class"):
        cfg_samples(net, 1.0, per_class=0, nfe=1)


def test_guidance_slider_draws_the_function_at_each_value():
    net = _unet()
    widget = guidance_slider(net, classes=[0, 1, 2], per_class=2, nfe=2, seed=1, w_max=4.0)
    slider = widget.children[0]
    assert (slider.min, slider.max, slider.value) == (0.0, 4.0, 0.0)
    torch.testing.assert_close(widget.result, cfg_samples(net, 0.0, classes=[0, 1, 2], per_class=2, nfe=2, seed=1))
    assert slider.layout.width == "680px"
    assert png_title(widget.static_png) == "classifier-free guidance, w = 0 (2 Euler steps)"
    slider.value = 3.0
    torch.testing.assert_close(widget.result, cfg_samples(net, 3.0, classes=[0, 1, 2], per_class=2, nfe=2, seed=1))
    assert png_title(widget.static_png) == "classifier-free guidance, w = 0 (2 Euler steps)"  # stays the default
    assert plt.get_fignums() == []  # every drawing is closed once shown


def test_figure_png_carries_the_title():
    fig, ax = plt.subplots()
    ax.set_title("VE, t = 0.50")
    png = figure_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png_title(png) == "VE, t = 0.50"
    fig.suptitle("all of it")
    assert png_title(figure_png(fig)) == "all of it"  # the suptitle names the whole figure
    plt.close(fig)
    fig = plt.figure()
    assert png_title(figure_png(fig)) == ""
    plt.close(fig)
    with pytest.raises(ValueError, match="PNG signature"):
        png_title(b"GIF89a")


def test_interactive_figure_bundles_the_widget_and_its_first_picture():
    import ipywidgets as widgets

    calls = []

    def draw(name="b", k=2):
        calls.append((name, k))
        fig, ax = plt.subplots()
        ax.plot(range(k))
        ax.set_title(f"{name}, k = {k}")
        return fig, k * 10

    shown = interactive_figure(draw, name=["a", "b"], k=widgets.IntSlider(value=2, min=1, max=5))
    assert isinstance(shown, InteractiveFigure) and calls == [("b", 2)] and shown.result == 20  # draw's defaults
    bundle = shown._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == shown.widget.model_id
    import base64

    assert png_title(base64.b64decode(bundle["image/png"])) == "b, k = 2"
    assert "b, k = 2" in bundle["text/plain"]
    shown.children[1].value = 4
    assert calls[-1] == ("b", 4) and shown.result == 40
    assert png_title(base64.b64decode(shown._repr_mimebundle_()["image/png"])) == "b, k = 2"
    assert plt.get_fignums() == []
    with pytest.raises(TypeError, match="must return a matplotlib Figure"):
        interactive_figure(lambda k=1: k, k=(1, 3))


def test_plot_images_grid_and_errors():
    fig, ax = plt.subplots()
    images = torch.linspace(-1, 1, 6 * 28 * 28).reshape(6, 1, 28, 28)
    plot_images(ax, images, nrow=3, title="grid")
    shown = ax.get_images()[0].get_array()
    assert shown.shape[:2] == (2 * 29 + 1, 3 * 29 + 1)  # 1-pixel padding around every image
    assert ax.get_title() == "grid"
    with pytest.raises(ValueError, match=r"\(B, 1 or 3, H, W\)"):
        plot_images(ax, torch.zeros(2, 28, 28), nrow=2)
    plt.close(fig)


def test_conditional_time_mlp_labels_and_null_class():
    torch.manual_seed(0)
    net = TimeMLP(hidden=16, depth=1, num_classes=2)
    x, t = torch.randn(4, 2), torch.rand(4)
    null = net(x, t, y=torch.full((4,), 2))
    torch.testing.assert_close(net(x, t), null)
    assert (net(x, t, y=torch.zeros(4, dtype=torch.long)) - null).abs().max() > 1e-4
    with pytest.raises(ValueError, match="labels in 0..1"):
        net(x, t, y=torch.full((4,), 3))
    with pytest.raises(ValueError, match="dtype int64"):
        net(x, t, y=torch.zeros(4))
    with pytest.raises(ValueError, match="unconditional"):
        TimeMLP(hidden=16, depth=1)(x, t, y=torch.zeros(4, dtype=torch.long))


def test_stroke_digits_are_recognisable_drawings():
    from course.datasets import stroke_digits
    from course.image_metrics import class_accuracy
    from course.pretrained import load

    plain = stroke_digits()
    assert plain.images.shape == (10, 1, 28, 28) and plain.labels.tolist() == list(range(10))
    assert set(plain.images.unique().tolist()) == {-1.0, 1.0}  # ink and background only
    ink = (plain.images > 0).flatten(1).float().mean(1)
    assert ((ink > 0.05) & (ink < 0.4)).all(), ink  # strokes, neither empty nor filled
    # 2 x 2 blocks: every pixel equals its block's top-left pixel
    blocks = plain.images[:, :, ::2, ::2].repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert torch.equal(blocks, plain.images)
    jittered = stroke_digits(jitter=1, copies=5, generator=torch.Generator().manual_seed(0))
    again = stroke_digits(jitter=1, copies=5, generator=torch.Generator().manual_seed(0))
    assert len(jittered) == 50 and torch.equal(jittered.images, again.images)
    assert jittered.labels.tolist() == [d for d in range(10) for _ in range(5)]
    assert not torch.equal(jittered.images[::5], plain.images)
    # the shipped evaluation classifier reads them as their digits (they are drawings of digits)
    assert class_accuracy(load("mnist_classifier"), jittered.images, jittered.labels) >= 0.8
    for bad in (-1, 2):
        with pytest.raises(ValueError, match="expected jitter 0 or 1"):
            stroke_digits(jitter=bad)
    with pytest.raises(ValueError, match="copies"):
        stroke_digits(copies=0)
