"""Class weights for the training loss, from what the run states, never from a site's own counts.

At ~100 images a site DP-SGD pulls a model toward the majority class; weighting each image's loss by
its class counters that. The weights come from the run: `class-weights = prior` with `class-prior = p`
(the known prevalence of class 1, e.g. from the literature or the registry) gives the balanced weights
1 / (2·p) and 1 / (2·(1 - p)); `class-weights = "w0,w1,..."` states them outright.

Why not each site's own counts: DP-SGD bounds one patient's influence on a step by clipping that
patient's gradient, which holds only if no other patient's gradient depends on that patient. Weights
computed from the site's labels make every image's weight depend on every other image's label, so
adding or removing one patient changes all the gradients: the standard DP-SGD analysis (and Opacus's
accountant) no longer covers the release. A site could release DP-noised counts first and pay for them
in ε; a run-given prior costs nothing and is what this module offers.

Under DP-SGD a weight scales an image's gradient before clipping, and clipping scales it back to the
clipping norm: the weights act only on images whose gradient is below it (at the default norm of 1 the
cnn's per-sample gradients are all far above it, docs/privacy.md), so they matter without DP or with a
large `dp-max-grad-norm`.
"""

from __future__ import annotations

from common.errors import ConfigError

MODES = ("none", "prior")


def parse(setting: str, prior: float, num_classes: int) -> tuple[float, ...] | None:
    """The run's per-class loss weights, or None (plain cross-entropy); a bad combination is a ConfigError."""
    text = setting.strip()
    if text == "none":
        return None
    if text == "prior":
        if num_classes != 2:
            raise ConfigError(f"class-weights = prior needs num-classes = 2 (got {num_classes}): "
                              "state one weight per class instead, class-weights = \"w0,w1,...\"")
        if not 0 < prior < 1:
            raise ConfigError("class-weights = prior needs class-prior = the prevalence of class 1, "
                              f"a number in (0, 1) (got {prior:g})")
        return (1 / (2 * (1 - prior)), 1 / (2 * prior))
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        raise ConfigError(f"class-weights = {setting!r} is not valid: expected none | prior | "
                          "one positive number per class, \"w0,w1,...\"") from None
    if len(weights) != num_classes or not all(0 < w < float("inf") for w in weights):
        raise ConfigError(f"class-weights = {setting!r}: expected {num_classes} positive numbers "
                          f"(num-classes = {num_classes}), one per class")
    return weights
