"""What differs between synthetic slides: timepoint, response and the biology they imply."""

from __future__ import annotations

from dataclasses import dataclass

# Response classes, best first.
RESPONSES = ("responder", "partial_responder", "non_responder")

#: Half-width (µm) of the band of tissue around the tumour compartment over which
#: ``cd8_factor`` acts, besides the compartment itself: the invasive margin as the pipeline
#: measures it (``regions.margin_um``, default 250 µm, on both sides of the bed's border).
#: The planted effect then multiplies the CD8 density of the tumour bed, of its margin and of
#: tumour + margin alike, whatever the sample's size or its mix of tumour edge and stroma.
CD8_EFFECT_BAND_UM = 250.0


@dataclass(frozen=True)
class SlideCondition:
    """Biological condition of one slide (what differs between patients and timepoints).

    Parameters
    ----------
    timepoint : {"pre", "post"}
        Pre-SBRT biopsy (a small piece of tissue) or post-treatment resection.
    response : {"responder", "partial_responder", "non_responder"}
        Patient response class; recorded in the truth.
    tissue_fraction : float
        Fraction of the slide area covered by tissue.
    tumor_fraction : float
        Fraction of the tissue that is tumour compartment.
    necrosis_fraction : float
        Fraction of the tumour compartment that is necrotic (where deep enough).
    fibrosis : float
        Extra fibroblast density and elastin in stroma, 0 (none) to 1 (doubled).
    immune_scale : float
        Patient-level multiplier on all lymphocyte densities outside TLS.
    cd8_factor : float
        The planted treatment effect: the CD8 T-cell density of the tumour compartment, of
        its part within :data:`CD8_EFFECT_BAND_UM` of its border and of the other tissue within
        that band (so of bed, margin and bed + margin as measured) is this times the unplanted
        one, cells in T-cell clusters and TLS counted. Clusters and TLS are packed full and keep
        their cells; the diffuse CD8 T cells carry the effect (see
        :func:`tme_pipeline.synth.cells.make_cells`). Tissue farther out is unchanged.
    tls_per_mm2 : float
        Expected TLS per mm² of stroma + margin.
    min_tls : int
        Place at least this many TLS if there is room.
    maturity_p : tuple of 3 floats
        Probabilities of aggregate, primary, secondary TLS.
    pdl1_fraction : float
        Target fraction of the tumour area in PD-L1+ patches.
    """

    timepoint: str = "post"
    response: str = "responder"
    tissue_fraction: float = 0.8
    tumor_fraction: float = 0.45
    necrosis_fraction: float = 0.1
    fibrosis: float = 0.2
    immune_scale: float = 1.0
    cd8_factor: float = 1.0
    tls_per_mm2: float = 1.2
    min_tls: int = 1
    maturity_p: tuple[float, float, float] = (0.35, 0.35, 0.3)
    pdl1_fraction: float = 0.3

    @classmethod
    def for_sample(cls, timepoint: str, response: str, *, immune_scale: float = 1.0) -> "SlideCondition":
        """Condition of a PROMIS-like sample.

        Post-SBRT resections of responders carry 2-4x more CD8 T cells in tumour and
        margin, more and more mature TLS, more necrosis and fibrosis; partial responders
        about half of that change; non-responders change little. Pre-SBRT biopsies are
        small pieces of tissue.
        """
        if timepoint not in ("pre", "post"):
            raise ValueError(f"timepoint must be 'pre' or 'post', got {timepoint!r}")
        if response not in RESPONSES:
            raise ValueError(f"response must be one of {', '.join(RESPONSES)}, got {response!r}")
        if timepoint == "pre":
            return cls(timepoint="pre", response=response, tissue_fraction=0.4, tumor_fraction=0.5,
                       necrosis_fraction=0.04, fibrosis=0.0, immune_scale=immune_scale,
                       cd8_factor=1.0, tls_per_mm2=0.8, maturity_p=(0.6, 0.3, 0.1))
        if response == "responder":
            return cls(timepoint="post", response=response, tissue_fraction=0.8, tumor_fraction=0.35,
                       necrosis_fraction=0.25, fibrosis=0.6, immune_scale=immune_scale,
                       cd8_factor=3.0, tls_per_mm2=1.8, maturity_p=(0.2, 0.35, 0.45))
        if response == "partial_responder":
            return cls(timepoint="post", response=response, tissue_fraction=0.8, tumor_fraction=0.42,
                       necrosis_fraction=0.17, fibrosis=0.4, immune_scale=immune_scale,
                       cd8_factor=1.8, tls_per_mm2=1.3, maturity_p=(0.35, 0.35, 0.3))
        return cls(timepoint="post", response=response, tissue_fraction=0.8, tumor_fraction=0.5,
                   necrosis_fraction=0.1, fibrosis=0.2, immune_scale=immune_scale,
                   cd8_factor=1.15, tls_per_mm2=0.9, maturity_p=(0.55, 0.3, 0.15))
