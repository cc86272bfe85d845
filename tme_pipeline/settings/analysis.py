"""The ``analysis`` section: what `tme analyze` tests (tme_pipeline.analysis).

Here rather than beside the code that uses it, so that reading a config imports pydantic only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AnalysisConfig"]


class AnalysisConfig(BaseModel):
    """Parameters of :func:`tme_pipeline.analysis.analyze` that a study declares before it sees its data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    primary_metrics: tuple[str, ...] = Field(
        ("density_CD8_T_tumor_margin",),
        description="Pre-declared primary endpoints (metric names): tested as their own Benjamini-Hochberg "
                    "family and reported first; every other metric is exploratory.")
