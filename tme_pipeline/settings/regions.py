"""The ``regions`` section: tissue, tumour bed, margin and necrosis parameters (tme_pipeline.regions).

Here rather than beside the code that uses it, so that reading a config imports pydantic only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["RegionsConfig"]


class RegionsConfig(BaseModel):
    """Parameters of :func:`tme_pipeline.regions.find_regions`; lengths in µm, areas in mm² or µm², densities in cells/mm²."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grid_um: float = Field(5.0, gt=0, description="Edge of a working-grid pixel (µm).")
    tumor_phenotypes: tuple[str, ...] = Field(("tumor",), min_length=1,
                                              description="Phenotype names (exact) counted as tumour cells.")
    density_sigma_um: float = Field(25.0, gt=0, description="Gaussian kernel sigma of the cell densities (µm).")
    tumor_density_per_mm2: float = Field(
        800.0, gt=0, description="Least tumour-cell density (cells/mm²) of the bed; viable osteosarcoma "
                                 "nests hold 2500-4000 cells/mm².")
    tumor_edge_fraction: float = Field(
        0.5, ge=0, lt=1, description="The bed's edge is where the tumour-cell density falls to this fraction of its "
                                     "median at tumour cells in the bed (unitless); 0 uses the floor alone.")
    smooth_um: float = Field(10.0, ge=0, description="Radius of the opening/closing that smooths the bed (µm).")
    min_tumor_island_mm2: float = Field(0.005, ge=0, description="Bed islands smaller than this are dropped (mm²) "
                                                                 "unless they hold a tumour nest.")
    nest_link_um: float = Field(30.0, gt=0, description="Tumour cells this close (µm, centre to centre) belong to "
                                                        "one nest.")
    min_nest_cells: int = Field(6, ge=1, description="A nest of at least this many linked tumour cells is bed "
                                                     "whatever its area (cells); ITBCC buds hold <= 4.")
    min_tumor_hole_mm2: float = Field(0.01, ge=0, description="Holes in the bed smaller than this are filled (mm²); "
                                                              "a hole's area is measured on the cells.")
    hole_vote_cells: int = Field(5, ge=1, description="A pixel next to a hole joins it when most of its this many "
                                                      "nearest viable cells are not tumour (cells); odd, so no ties.")
    margin_um: float = Field(250.0, gt=0,
                             description="Half-width of the invasive margin, each side of the border (µm).")
    min_region_area_mm2: float = Field(0.05, ge=0, description="A region smaller than this carries no density (mm²).")
    min_region_cells: int = Field(50, ge=0, description="A region with fewer cells carries no density (cells).")
    tissue_smooth_um: float = Field(5.0, ge=0,
                                    description="Gaussian sigma applied to the image before the tissue test (µm).")
    tissue_z: float = Field(6.0, gt=0, description="Tissue is above the glass level by this many glass noise "
                                                    "SDs (median over channels; unitless).")
    tissue_edge_fraction: float = Field(0.5, gt=0, lt=1, description="The tissue's edge is where its broad-band "
                                        "glow above glass falls to this fraction of the tissue's median (unitless).")
    glass_reference_um: float = Field(40.0, gt=0, description="Pixels farther than this from every detected cell "
                                                               "are the glass reference (µm).")
    min_tissue_island_mm2: float = Field(0.002, ge=0, description="Tissue pieces smaller than this are dust (mm²).")
    min_glass_hole_mm2: float = Field(0.0002, ge=0, description="Glass holes in tissue smaller than this are "
                                                                "filled (mm²).")
    debris_max_nucleus_um2: float = Field(15.0, gt=0, description="Detected nuclei smaller than this are debris "
                                                                   "(µm²); a viable nucleus is larger.")
    necrosis_max_viable_per_mm2: float = Field(1500.0, ge=0, description="Necrosis holds fewer viable nuclei "
                                                                          "than this (cells/mm²).")
    necrosis_min_debris_per_mm2: float = Field(800.0, ge=0, description="Necrosis holds more debris than this "
                                                                          "(objects/mm²).")
    necrosis_min_debris_ratio: float = Field(2.0, gt=0, description="Where debris outnumbers viable nuclei by "
                                              "this ratio it is necrosis whatever the viable density (unitless).")
    fibrosis_max_cells_per_mm2: float = Field(800.0, ge=0, description="Fibrosis (paucicellular bed) holds fewer "
                                                                        "viable nuclei than this (cells/mm²).")
    min_focus_mm2: float = Field(0.005, ge=0, description="Necrotic or fibrotic foci smaller than this are "
                                                          "dropped (mm²).")
