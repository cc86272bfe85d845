"""The ``tls`` section: TLS detection and staging parameters (tme_pipeline.tls).

Here rather than beside the code that uses it, so that reading a config imports pydantic only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["TLSConfig"]


class TLSConfig(BaseModel):
    """Parameters of TLS detection and staging (all lengths in µm, areas in µm²)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    b_phenotypes: tuple[str, ...] = Field(("B",), description="Phenotype names counted as B cells (exact match).")
    t_phenotypes: tuple[str, ...] = Field(("CD8_T", "CD4_T", "Treg"),
                                          description="Phenotype names counted as T cells (exact match).")
    link_um: float = Field(
        20.0, gt=0, description="B-B linking distance (µm); tlsR uses 10-15 µm, see the module notes.")
    min_b_neighbors: int = Field(
        1, ge=0, description="B neighbours within link_um (count) for a B cell to join a core.")
    min_b_cells: int = Field(50, ge=1, description="B cells (count) in a core; tlsR: 50.")
    t_zone_um: float = Field(
        50.0, gt=0, description="Reach (µm) of the T-cell zone around the B cells; tlsR: 50 µm.")
    min_t_cells: int = Field(10, ge=0, description="T cells (count) within t_zone_um of the core; tlsR: 10.")
    min_b_density_per_mm2: float = Field(3000.0, ge=0, description="B cells per mm² of the B-core outline.")
    min_area_um2: float = Field(7000.0, ge=0, description="Smallest TLS outline (µm², ~95 µm across).")
    outline_um: float = Field(12.0, gt=0, description="Closing radius (µm) joining cells into the outline.")
    cell_radius_um: float = Field(
        4.0, ge=0, description="Margin (µm) of the outline beyond the outermost cell centres.")
    fdc_marker: str = Field("CD21", description="FDC marker (var name) whose whole-cell intensity shows the mesh.")
    fdc_background_quantile: float = Field(
        0.5, gt=0, lt=1, description="Quantile (fraction) of CD21 in cells outside B cores; 0.5, the median, "
                                     "ignores a minority with spill-over.")
    fdc_mad_factor: float = Field(
        4.0, ge=0, description="FDC threshold above that quantile, in robust SDs (1.4826 MAD).")
    primary_min_fdc_fraction: float = Field(
        0.3, ge=0, le=1, description="Fraction of core B cells on the mesh for primary.")
    gc_markers: tuple[str, ...] = Field(
        ("Ki67", "CD23", "BCL6"), description="GC markers used when the panel has them.")
    gc_area_ratio: float = Field(1.4, gt=0, description="GC B nucleus area / the slide's B-cell median (ratio) "
                                                         "at least.")
    gc_dapi_ratio: float = Field(0.75, gt=0, description="GC B nucleus DAPI / the slide's B-cell median (ratio) "
                                                          "at most.")
    gc_core_fraction: float = Field(
        0.6, gt=0, le=1, description="Inner part (fraction of core radius) searched for a GC.")
    secondary_min_gc_score: float = Field(
        0.02, ge=0, le=1, description="GC-like fraction (0-1) of inner core B cells for secondary.")
