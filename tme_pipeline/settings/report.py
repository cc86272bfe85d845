"""The ``report`` section: what the reports show (tme_pipeline.report).

Here rather than beside the code that uses it, so that reading a config imports pydantic only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DEFAULT_KEY_METRICS", "ReportConfig"]

#: The metrics a reader checks first: shown at the top of a slide page and per slide and
#: patient on the cohort page.
DEFAULT_KEY_METRICS: tuple[str, ...] = (
    "density_CD8_T_tumor", "density_CD8_T_margin", "density_lymphocytes_tumor", "tls_count", "tls_per_mm2",
    "percent_necrosis",
)


class ReportConfig(BaseModel):
    """Settings of the reports (config section ``report``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_metrics: tuple[str, ...] = Field(
        DEFAULT_KEY_METRICS, min_length=1,
        description="Metric names shown first on a slide page and per slide and patient on the cohort page.")
    map_max_px: int = Field(1000, ge=100, le=4000,
                            description="Most pixels on the phenotype map's longer side (bounds the picture).")
    photo_quality: int = Field(85, ge=50, le=100,
                               description="JPEG quality of the embedded overview and TLS close-ups.")
