"""One typed configuration for a whole run, loaded from YAML.

Every section is a pydantic model that refuses unknown keys, so a typo in a config
file is an error naming the key and the file rather than a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The analysis sections from their light modules: reading a config imports pydantic only.
from .settings.analysis import AnalysisConfig
from .settings.metrics import MetricsConfig
from .settings.regions import RegionsConfig
from .settings.report import ReportConfig
from .settings.tls import TLSConfig

__all__ = [
    "Config",
    "MarkerSpec",
    "SegmentationConfig",
    "ClassicConfig",
    "StarDistSettings",
    "RunConfig",
    "CellsConfig",
    "GatingConfig",
    "PhenotypeRule",
    "CompensationConfig",
    "load_config",
    "default_config_path",
    "read_yaml_mapping",
]

_DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MarkerSpec(_Strict):
    """One marker of the panel.

    ``aliases`` are the channel names (compared case-insensitively, ignoring spaces,
    ``-`` and ``_``) under which the marker may appear in a slide's metadata.
    """

    aliases: tuple[str, ...] = ()
    compartment: Literal["nuclear", "membrane", "cytoplasm", "perinuclear", "whole"] = "whole"
    optional: bool = False


class ClassicConfig(_Strict):
    """The classical nucleus segmenter: smoothing, global threshold, watershed (µm)."""

    sigma_um: float = Field(0.7, gt=0)
    min_distance_um: float = Field(3.0, gt=0)
    min_area_um2: float = Field(12.0, ge=0)
    max_area_um2: float = Field(400.0, gt=0)


class StarDistSettings(_Strict):
    """The StarDist nucleus model and how it runs."""

    model: str = Field(
        "stardist_fluo_real",
        description="a model folder, or the name of one under the shipped models/ "
        "(ours: weights.pt + config.json; or an official StarDist Keras folder)",
    )
    prob_thresh: float | None = Field(None, ge=0, le=1, description="null: the model's thresholds.json")
    nms_thresh: float | None = Field(None, ge=0, le=1, description="null: the model's thresholds.json")
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda or cuda:N")
    precision: Literal["fp32", "auto", "bf16", "fp16"] = Field(
        "fp32",
        description="arithmetic of the net: fp32 (auto is the same) on every device, so CPU, GPU and any "
        "tiling give the same nuclei; autocast is opt-in: bf16 (~2x faster on CPUs with AVX512-BF16/AMX) "
        "or fp16 (CUDA), same F1 within 0.001 but tiles agree with one piece for ~98% of nuclei at IoU 0.9",
    )
    batch_size: int | None = Field(None, ge=1, description="patches per forward pass; null: by device")
    concurrent_passes: int | None = Field(
        1, ge=1,
        description="forward passes run at once per process (each ~0.7 GB on a 512 µm tile at 0.5 µm/px), "
        "each on all of torch's threads while the other Dask threads suppress and render other tiles; "
        "null: no bound (peak memory then grows with the number of tiles that overlap by chance)",
    )


class SegmentationConfig(_Strict):
    """Nucleus segmentation and the tile grid it runs on (µm)."""

    method: Literal["stardist", "classic"] = "stardist"
    channel: str = "DAPI"
    tile_um: float = Field(512.0, gt=0)
    overlap_um: float = Field(40.0, ge=0)
    stardist: StarDistSettings = StarDistSettings()
    classic: ClassicConfig = ClassicConfig()


class CellsConfig(_Strict):
    """Nuclei grown into cells, and the compartments markers are read in (µm)."""

    expand_um: float = Field(3.0, ge=0, description="growth of each nucleus into its cell; cells never overlap")
    membrane_um: float = Field(1.5, gt=0, description="width of the membrane ring: the outer part of each cell")
    perinuclear_um: float = Field(
        1.0, gt=0, description="width of the perinuclear band: cell pixels outside the nucleus and this close to it"
    )
    neighbour_correction: bool = Field(
        False, description="remove the share of each cell's signal that touching neighbours put in its boundary "
        "pixels (REDSEA, shared border lengths; tme_pipeline.spillover), for `neighbour_markers`",
    )
    neighbour_markers: tuple[str, ...] = Field(
        ("CD3", "CD8", "CD20"), description="markers the neighbour correction applies to, in their compartment",
    )
    neighbour_boundary_um: float = Field(
        1.0, gt=0, description="width of each cell's boundary band for the neighbour correction, µm "
        "(at most cells.membrane_um)",
    )


class GatingConfig(_Strict):
    """Positivity per marker: automatic per slide, manual gates override.

    Manual gates are in the units of ``X`` in ``cells.h5ad`` (the slide's raw
    intensity in the marker's compartment, before background subtraction).
    """

    transform: Literal["arcsinh", "log"] = "arcsinh"
    min_quality: float = Field(
        0.5, ge=0, description="below this gate quality a marker is flagged as having no clear positive population"
    )
    manual: dict[str, float] = Field(default_factory=dict, description="marker -> gate, every slide")
    per_slide: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="slide_id -> marker -> gate; overrides `manual` for that slide"
    )
    weak_fraction: float = Field(
        0.6, gt=0, le=1,
        description="in a rule with two or more '+' markers, one of them may lie between its weak gate "
        "(background + weak_fraction x (gate - background)) and its gate when the others pass theirs: "
        "co-expression is evidence, as for a crisp CD8+ cell with faint CD3; 1 turns this off",
    )
    min_dapi_fraction: float = Field(
        0.4, ge=0, lt=1,
        description="objects whose nuclear DAPI mean is below this fraction of the slide's median nucleus are "
        "debris (necrotic, pyknotic fragments, autofluorescent specks), not cells to phenotype: they get "
        "'other'; 0 turns this off",
    )
    exclusive: tuple[tuple[str, str], ...] = Field(
        (), description="pairs of lineage markers (e.g. [CD20, CD3]): a cell above both gates keeps only the one "
        "standing higher above its gate, (x - background) / (gate - background)",
    )
    within: dict[str, str] = Field(
        default_factory=dict,
        description="marker -> phenotype: the marker's automatic gate is found on the cells of that "
        "phenotype only (e.g. PD-L1 on tumor cells, where the tumour proportion score is read) and "
        "then applies to every cell; the marker must not take part in any phenotype rule",
    )


class PhenotypeRule(_Strict):
    """One phenotype: the marker signs a cell must show, e.g. ``CD3+ CD8+``."""

    name: str
    markers: str = Field(description="space-separated marker signs, e.g. 'CD3+ CD8- FOXP3-'")

    def signs(self) -> dict[str, bool]:
        """Marker -> required positivity, parsed from ``markers`` (the sign is the last character)."""
        out: dict[str, bool] = {}
        for token in self.markers.split():
            if len(token) < 2 or token[-1] not in "+-":
                raise ValueError(f"phenotype {self.name!r}: {token!r} must end in + or -")
            out[token[:-1]] = token[-1] == "+"
        if not out:
            raise ValueError(f"phenotype {self.name!r}: no markers")
        return out


class CompensationConfig(_Strict):
    """Spectral spillover between channels: ``observed = spillover @ true`` over ``markers``."""

    markers: tuple[str, ...] = ()
    spillover: tuple[tuple[float, ...], ...] = ()

    @model_validator(mode="after")
    def _square(self) -> CompensationConfig:
        n = len(self.markers)
        if len(self.spillover) != n or any(len(row) != n for row in self.spillover):
            raise ValueError(f"compensation.spillover must be {n} x {n} (one row and column per marker)")
        return self


class RunConfig(_Strict):
    """How a run is executed: Dask scheduler, workers and threads (``tme_pipeline.parallel``)."""

    scheduler: str = Field(
        "threads",
        description="'threads', 'synchronous', 'processes', 'local-cluster' or a "
        "distributed scheduler address such as tcp://host:8786",
    )
    n_workers: int | None = Field(
        None, ge=1, description="threads, processes or local-cluster workers (SLURM: jobs); null: one per core",
    )
    threads_per_worker: int = Field(
        1, ge=1, description="Dask threads, and torch intra-op threads, in each worker process of a cluster",
    )
    cluster: str | None = Field(
        None, description="a dask-jobqueue cluster file (configs/cluster-slurm.yaml); overrides `scheduler`",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per tile call; null: torch's own (a cluster worker: "
        "threads_per_worker)",
    )
    slides_in_flight: int | None = Field(
        None, ge=1, description="slides run at once on a distributed scheduler (local-cluster, an address, a "
        "cluster file), so that a cluster's workers are never idle between slides; null: one per worker there, "
        "1 on a local scheduler (where more than 1 is refused: its tile pools would oversubscribe the cores)",
    )
    progress: Literal["auto", "bars", "log", "quiet"] = Field(
        "auto", description="how progress is shown (tme_pipeline.progress): 'bars' (a tqdm bar per slide's tiled "
        "stage and one for the batch, on standard error), 'log' (log lines), 'quiet' (nothing; `--quiet`), "
        "'auto' (bars on a terminal, else log)",
    )
    progress_every_s: float = Field(
        10.0, gt=0, description="log mode: at most one progress line per stage this often (s)",
    )


class Config(_Strict):
    """The whole run's configuration. ``configs/default.yaml`` holds the defaults."""

    panel: dict[str, MarkerSpec]
    channel_map: dict[str, str] = Field(
        default_factory=dict,
        description="explicit slide channel name -> marker, e.g. {'Opal 520': 'CD8'}",
    )
    channel_names: tuple[str, ...] | None = Field(
        None,
        description="channel names, in page order, for slides whose files carry none "
        "(plain multi-page TIFF); otherwise the file's own names are used",
    )
    timepoints: tuple[str, ...] = ("pre", "post")
    segmentation: SegmentationConfig = SegmentationConfig()
    cells: CellsConfig = CellsConfig()
    gating: GatingConfig = GatingConfig()
    phenotypes: tuple[PhenotypeRule, ...] = ()
    compensation: CompensationConfig | None = None
    tls: TLSConfig = TLSConfig()
    regions: RegionsConfig = RegionsConfig()
    metrics: MetricsConfig = MetricsConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    report: ReportConfig = ReportConfig()
    run: RunConfig = RunConfig()

    @field_validator("timepoints")
    @classmethod
    def _two_distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) < 1 or len(set(value)) != len(value):
            raise ValueError(f"timepoints must be distinct labels, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _references_exist(self) -> Config:
        for channel, marker in self.channel_map.items():
            if marker not in self.panel:
                raise ValueError(
                    f"channel_map maps {channel!r} to {marker!r}, which is not a panel marker "
                    f"({', '.join(self.panel)})"
                )
        gated = dict(self.gating.manual)
        for gates in self.gating.per_slide.values():
            gated.update(gates)
        referenced = [(f"gating gate for {m!r}", m) for m in gated]
        for rule in self.phenotypes:
            referenced += [(f"phenotype {rule.name!r}", m) for m in rule.signs()]
        if self.compensation is not None:
            referenced += [("compensation", m) for m in self.compensation.markers]
        for where, marker in referenced:
            if marker not in self.panel:
                raise ValueError(f"{where} names {marker!r}, which is not a panel marker ({', '.join(self.panel)})")
        names = [rule.name for rule in self.phenotypes]
        if len(set(names)) != len(names):
            raise ValueError(f"phenotypes: names must be unique, got {names}")
        in_rules = {m for rule in self.phenotypes for m in rule.signs()}
        for marker, phenotype in self.gating.within.items():
            if marker not in self.panel:
                raise ValueError(f"gating.within names {marker!r}, which is not a panel marker ({', '.join(self.panel)}); "
                                 "give `gating: {within: {}}` with a panel of your own")
            if phenotype not in names:
                raise ValueError(f"gating.within gates {marker!r} within {phenotype!r}, which is not a phenotype "
                                 f"({', '.join(names)})")
            if marker in in_rules:
                raise ValueError(f"gating.within: {marker!r} takes part in the phenotype rules, so it cannot be "
                                 f"gated within a phenotype (the phenotypes need its gate first)")
        if self.segmentation.channel not in self.panel:
            raise ValueError(
                f"segmentation.channel {self.segmentation.channel!r} is not a panel marker "
                f"({', '.join(self.panel)})"
            )
        return self


def default_config_path() -> Path:
    """Path of the shipped default configuration (the PROMIS-like panel)."""
    return _DEFAULT_CONFIG


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "config"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


#: Mappings a user file replaces whole: a lab's panel (and which markers are gated within a
#: phenotype) is not a patch of ours.
_REPLACED_WHOLE = ("panel", "within")


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in _REPLACED_WHOLE:
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None) -> Config:
    """Load and validate a run configuration.

    A user file is merged over ``configs/default.yaml`` section by section, except
    ``panel`` and ``gating.within``, which a user file replaces whole (a lab's panel is
    not a patch of ours).

    Parameters
    ----------
    path : str or Path, optional
        YAML file. ``None`` gives the shipped defaults.

    Returns
    -------
    Config

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the YAML does not parse or a key is unknown or invalid; the message names
        the file and every offending key.
    """
    defaults = read_yaml_mapping(_DEFAULT_CONFIG)
    data = defaults
    source = _DEFAULT_CONFIG
    if path is not None:
        source = Path(path)
        data = _deep_merge(defaults, read_yaml_mapping(source))
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ValueError(f"{source}: invalid configuration:\n{_format_errors(error)}") from None


def read_yaml_mapping(path: str | Path, *, kind: str = "configuration") -> dict:
    """A YAML file holding one mapping (``yaml.safe_load``); empty gives ``{}``.

    Raises
    ------
    FileNotFoundError
        No such file; the message names it and the `kind` of file.
    ValueError
        Not YAML, or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {kind} file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a {kind} file must be a mapping of settings, got {type(data).__name__}")
    return data
