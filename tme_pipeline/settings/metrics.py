"""The ``metrics`` section: phenotype groups and cut-offs of the slide metrics (tme_pipeline.metrics).

Here rather than beside the code that uses it, so that reading a config imports pydantic only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["MetricsConfig"]


class MetricsConfig(BaseModel):
    """Parameters of :func:`tme_pipeline.metrics.slide_metrics`: phenotype names (exact), cut-offs in cells/mm², lengths in µm."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    t_cells: tuple[str, ...] = Field(("CD8_T", "CD4_T", "Treg"), min_length=1,
                                     description="Phenotype names (exact) of the group t_cells: every CD3+ T cell.")
    lymphocytes: tuple[str, ...] = Field(("CD8_T", "CD4_T", "Treg", "B"), min_length=1,
                                         description="Phenotype names (exact) of the group lymphocytes: T and B.")
    cd8_phenotype: str = Field("CD8_T", description="The CD8 T-cell phenotype (immune class, CD8/Treg ratio).")
    treg_phenotype: str = Field("Treg", description="The regulatory T-cell phenotype (CD8/Treg ratio).")
    pdl1_marker: str = Field("PD-L1", description="Marker whose obs['<marker>_pos'] is PD-L1 positivity.")
    tumor_phenotypes: tuple[str, ...] = Field(("tumor",), min_length=1,
                                              description="Phenotype names (exact) counted as tumour cells (TPS, CPS).")
    immune_phenotypes: tuple[str, ...] = Field(("CD8_T", "CD4_T", "Treg", "B"),
                                               description="Phenotype names (exact) of the CPS's immune cells.")
    min_viable_tumor_cells: int = Field(100, ge=1, description="Fewest viable tumour cells (count) for TPS and CPS.")
    min_nucleus_um2: float = Field(15.0, ge=0, description="Smallest viable tumour nucleus (µm²); less is debris.")
    min_viable_area_mm2: float = Field(0.05, ge=0, description="A region whose viable (non-necrotic) part is "
                                       "smaller carries no density (mm²); as regions.min_region_area_mm2.")
    inflamed_core_cd8_per_mm2: float = Field(100.0, ge=0, description="Inflamed: core CD8 density above (cells/mm²).")
    excluded_margin_cd8_per_mm2: float = Field(200.0, ge=0,
                                               description="Excluded: margin CD8 density above (cells/mm²).")
    profile_groups: tuple[str, ...] = Field(("CD8_T", "B", "t_cells", "lymphocytes"),
                                            description="Groups (phenotype names, t_cells, lymphocytes) profiled.")
    profile_bin_um: float = Field(50.0, gt=0, description="Bin width of the infiltration profile (µm).")
    profile_range_um: float = Field(500.0, gt=0, description="The profile spans -range..+range of the border (µm).")
    profile_min_area_mm2: float = Field(0.005, ge=0, description="A profile bin with less tissue: no density (mm²).")

    @model_validator(mode="after")
    def _whole_bins(self) -> MetricsConfig:
        n = self.profile_range_um / self.profile_bin_um
        if abs(n - round(n)) > 1e-9:
            raise ValueError(f"metrics.profile_range_um ({self.profile_range_um:g} µm) must be a whole number of "
                             f"metrics.profile_bin_um ({self.profile_bin_um:g} µm)")
        return self
