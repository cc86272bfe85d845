"""``stages.json``: what each stage of a slide folder was computed from, and which are stale.

Per stage the record keeps a key, the SHA-256 of: the stage's name, the package version,
the config sections it reads, its other inputs (slide file, model files) and the keys of
its upstream stages. A stage is stale when the key the current config and code give
differs from the recorded one, when one of its files is missing or changed size, or when
a stage upstream of it is stale: so a changed gate makes ``phenotype`` and what follows it
stale, and a changed model everything. Stage code changes are seen through the package
version only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .config import Config
from .results import STAGES_JSON
from .stages import SlideInputs, Stage, StageOutput

__all__ = ["FORMAT", "stage_keys", "stale_stages", "stage_record", "read_records", "carry_files", "written_files"]

#: Version of the stages.json layout; a folder of another format is recomputed whole.
FORMAT = 1


def _sha256(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _section(config: Config, dotted: str) -> object:
    value: object = config.model_dump(mode="json")
    for part in dotted.split("."):
        value = value[part]  # type: ignore[index]
    return value


def stage_keys(stages: Sequence[Stage], inputs: SlideInputs) -> dict[str, dict]:
    """Per stage: its key and what went into it (``config_sha256``, ``inputs``, ``upstream``, ``version``)."""
    keys: dict[str, dict] = {}
    for stage in stages:
        basis = {
            "stage": stage.name,
            "version": __version__,
            "config_sha256": _sha256({k: _section(inputs.config, k) for k in stage.reads}),
            "inputs": stage.inputs(inputs) if stage.inputs else {},
            "upstream": {u: keys[u]["key"] for u in stage.upstream},
        }
        keys[stage.name] = {"key": _sha256(basis), **{k: v for k, v in basis.items() if k != "stage"}}
    return keys


def _nested(stages: Sequence[Stage], path: str) -> list[str]:
    """Write paths of other stages that lie inside ``path``: not part of its owner's files."""
    return [w for s in stages for w in s.writes if w != path and w.startswith(path + "/")]


def _files_of(folder: Path, path: str, exclude: Sequence[str]) -> list[Path]:
    target = folder / path
    if target.is_file():
        return [target]
    skip = {folder / e for e in exclude}
    found = []
    for root, dirs, names in os.walk(target):
        dirs[:] = sorted(d for d in dirs if Path(root, d) not in skip)
        found += [Path(root, n) for n in sorted(names)]
    return found


def written_files(folder: Path, stage: Stage, stages: Sequence[Stage]) -> list[dict]:
    """The files a stage wrote in ``folder``: per write path that exists, its bytes and file count."""
    out = []
    for path in stage.writes:
        if (folder / path).exists():
            files = _files_of(folder, path, _nested(stages, path))
            out.append({"path": path, "bytes": sum(f.stat().st_size for f in files), "files": len(files)})
    return out


def stage_record(stage: Stage, key: Mapping, output: StageOutput, *, folder: Path, stages: Sequence[Stage],
                 seconds: float) -> dict:
    """The ``stages.json`` entry of a stage that just ran in ``folder``."""
    return {
        **key,
        "reads": list(stage.reads),
        "files": written_files(folder, stage, stages),
        "seconds": round(seconds, 3),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "info": dict(output.info),
        "warnings": list(output.warnings),
    }


def read_records(folder: Path) -> dict[str, dict]:
    """The stage records of a finished slide folder; empty when it has none (or another format)."""
    path = folder / STAGES_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except json.JSONDecodeError:
        return {}  # a damaged record is as good as none: everything is recomputed
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return {}
    return dict(data.get("stages", {}))


def _intact(folder: Path, stage: Stage, stages: Sequence[Stage], record: Mapping) -> bool:
    recorded = {f["path"]: (f["bytes"], f["files"]) for f in record.get("files", [])}
    present = {f["path"]: (f["bytes"], f["files"]) for f in written_files(folder, stage, stages)}
    return recorded == present


def stale_stages(stages: Sequence[Stage], keys: Mapping[str, Mapping], records: Mapping[str, Mapping],
                 folder: Path, *, force_from: str | None = None) -> list[str]:
    """Names of the stages to run, in order: stale, forced, or downstream of one that is.

    Parameters
    ----------
    stages : sequence of Stage
    keys : from :func:`stage_keys`
    records : from :func:`read_records` of the finished folder
    folder : Path
        The finished slide folder (absent for a new slide).
    force_from : str, optional
        Run this stage and everything after it whatever the records say.
    """
    names = [s.name for s in stages]
    if force_from is not None and force_from not in names:
        raise ValueError(f"--from {force_from!r}: not a stage ({', '.join(names)})")
    forced = set(names[names.index(force_from):]) if force_from is not None else set()
    stale: list[str] = []
    for stage in stages:
        record = records.get(stage.name)
        if (stage.name in forced or record is None or record.get("key") != keys[stage.name]["key"]
                or any(u in stale for u in stage.upstream) or not _intact(folder, stage, stages, record)):
            stale.append(stage.name)
    return stale


def carry_files(old: Path, new: Path, reused: Sequence[Stage], stages: Sequence[Stage], rerun: Sequence[str]) -> None:
    """Hard-link (else copy) the files of reused stages from the finished folder into the new one.

    Files under a path that a re-run stage writes are left out, so that no stage ever writes
    into a file the finished folder shares.
    """
    rerun_paths = [w for s in stages if s.name in rerun for w in s.writes]
    for stage in reused:
        for path in stage.writes:
            if not (old / path).exists():
                continue
            for source in _files_of(old, path, [*_nested(stages, path), *rerun_paths]):
                target = new / source.relative_to(old)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(source, target)
                except OSError:  # a file system without hard links
                    shutil.copy2(source, target)
