"""Slide styles: the look of the lab that stained and scanned a synthetic slide.

``"default"`` is the look the segmentation model and the gates were trained and tuned on.
``"external_lab"`` is a validation style drawn per slide from wider priors than training
(another lab's staining, scanner and tissue handling), so that accuracy measured on it says
what a user's lab will feel rather than how well we fit our own generator. Every parameter
is drawn from the slide's seed on its own random stream, so the default style's draws (and
pixels) do not depend on this module.

Priors of ``"external_lab"`` (default values in brackets)
------------------------------------------------------------
=====================  ================================================  ===============
nucleus irregularity   harmonic amplitudes x U(1.6, 3.0)                  [x 1]
nucleus overlap        packing factor U(0.72, 0.86)                      [0.92]
chromatin texture      amplitude U(0.35, 0.7), grain sigma U(0.3, 0.9) µm [0.3, 0.5 µm]
blur                   PSF sigma U(0.55, 1.2) µm                          [U(0.6, 0.8)]
noise                  shot k U(1.0, 4.0), read sd U(5, 25) counts        [1.5, 8]
offset                 U(80, 1200) counts per channel                     [U(150, 400)]
stain gain             U(0.7, 1.3) per channel (±30 %)                    [log-normal sd 0.15]
spillover              to the redder neighbour U(0.02, 0.12), to the      [U(0.03, 0.06),
                       bluer one U(0.005, 0.05)                            U(0.01, 0.025)]
autofluorescence       per-channel strength x U(0.5, 2.5)                 [x 1]
red blood cells        extra in CD3 (520, green) and FOXP3 (570, yellow)  [none]
                       x U(2, 6)
collagen               fibre autofluorescence x U(1, 3)                   [x 1]
necrotic debris        debris count x U(1, 3)                             [x 1]
=====================  ================================================  ===============
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

STYLES = ("default", "external_lab")


@dataclass(frozen=True)
class SlideStyle:
    """Per-slide look parameters (recorded in truth.json under ``style``).

    name : str, one of :data:`STYLES`.
    shape_scale : float, multiplier of the nuclei's harmonic (irregularity) amplitudes.
    pack_factor : float, nuclei closer than ``pack_factor * (s_i + s_j)`` are not both kept
        (lower: more overlap).
    chromatin_amp : float, relative amplitude of the DAPI chromatin texture.
    chromatin_um : float, grain (Gaussian sigma) of the chromatin texture in µm.
    af_scale : (C,) float, multiplier of each channel's autofluorescence strength.
    rbc_green_yellow : float, extra red-blood-cell autofluorescence in CD3 and FOXP3, as a
        multiple of the broad-band one (0: none).
    collagen_scale : float, multiplier of fibre (collagen/elastin) autofluorescence.
    debris_scale : float, multiplier of the necrotic debris count.
    """

    name: str = "default"
    shape_scale: float = 1.0
    pack_factor: float = 0.92
    chromatin_amp: float = 0.3
    chromatin_um: float = 0.5
    af_scale: tuple[float, ...] = (1.0,) * 8
    rbc_green_yellow: float = 0.0
    collagen_scale: float = 1.0
    debris_scale: float = 1.0

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def check_style(style: str, where: str = "") -> str:
    """Return ``style`` or raise ValueError naming ``where`` and the known styles."""
    if style not in STYLES:
        raise ValueError(f"{where}: unknown style {style!r}; expected one of {STYLES}")
    return style


def draw_style(style: str, *, seed: int) -> tuple[SlideStyle, dict]:
    """Draw one slide's look from its style's priors.

    Parameters
    ----------
    style : one of :data:`STYLES`.
    seed : int, the slide seed.

    Returns
    -------
    look : SlideStyle
    acquisition : dict of acquisition overrides, empty for the default style: ``gain`` and
        ``offset`` (C,), ``spill_red`` and ``spill_blue`` ((C-1,) fractions into the redder
        and the bluer spectral neighbour, in spectral order), ``psf_sigma_um``, ``shot_k``,
        ``read_sd``; see :meth:`tme_pipeline.synth.render.Acquisition.draw`.
    """
    check_style(style)
    if style == "default":
        return SlideStyle(), {}
    rng = np.random.default_rng([seed, 808])
    c = 8
    look = SlideStyle(
        name=style,
        shape_scale=round(float(rng.uniform(1.6, 3.0)), 4),
        pack_factor=round(float(rng.uniform(0.72, 0.86)), 4),
        chromatin_amp=round(float(rng.uniform(0.35, 0.7)), 4),
        chromatin_um=round(float(rng.uniform(0.3, 0.9)), 4),
        af_scale=tuple(np.round(rng.uniform(0.5, 2.5, c), 4).tolist()),
        rbc_green_yellow=round(float(rng.uniform(2.0, 6.0)), 4),
        collagen_scale=round(float(rng.uniform(1.0, 3.0)), 4),
        debris_scale=round(float(rng.uniform(1.0, 3.0)), 4),
    )
    acq = {"gain": np.round(rng.uniform(0.7, 1.3, c), 4),
           "offset": np.round(rng.uniform(80, 1200, c)),
           "spill_red": np.round(rng.uniform(0.02, 0.12, c - 1), 4),
           "spill_blue": np.round(rng.uniform(0.005, 0.05, c - 1), 4),
           "psf_sigma_um": round(float(rng.uniform(0.55, 1.2)), 3),
           "shot_k": round(float(rng.uniform(1.0, 4.0)), 3),
           "read_sd": round(float(rng.uniform(5.0, 25.0)), 3)}
    return look, acq
