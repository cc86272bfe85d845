"""Layers that point one way: the model package knows nothing of the pipeline, the run path
never imports the training code, and the tiled stages use the tiling's public API."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from skimage.io import imsave

from blobs import make_nuclei

PACKAGE = Path(__file__).resolve().parents[1] / "tme_pipeline"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """Every import of a module, at any depth (lazy ones in functions too): the absolute
    module it names, the names it takes from it, and the line."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((module, [a.name for a in node.names], node.lineno))
    return found


def _modules(under: Path) -> list[Path]:
    return sorted(p for p in under.rglob("*.py") if "__pycache__" not in p.parts)


def test_imports_are_resolved_as_python_does():
    # The oracle of the tests below: relative imports become the modules Python loads.
    (found,) = [i for i in _imports(PACKAGE / "cells.py") if i[0] == "tme_pipeline.tiling"]
    assert "map_tiles" in found[1]
    assert ("tme_pipeline.segment.net", ["StarDistConfig"]) in [i[:2] for i in _imports(PACKAGE / "segment" / "weights.py")]


@pytest.mark.parametrize(("under", "allowed"), [
    # The model and its inference: nothing of tme_pipeline outside segment.
    ("segment", ()),
    # Training reads its data from the synthetic generator, and nothing else of the pipeline.
    ("segment/train", ("tme_pipeline.synth",)),
])
def test_the_model_package_imports_nothing_of_the_pipeline(under, allowed):
    root = PACKAGE / under
    offending = [
        f"{_module_name(p)}:{line} imports {module}"
        for p in _modules(root) if under != "segment" or PACKAGE / "segment" / "train" not in p.parents
        for module, _, line in _imports(p)
        if module.startswith("tme_pipeline") and not module.startswith(("tme_pipeline.segment", *allowed))
        and module != "tme_pipeline"
    ]
    assert not offending, offending


def test_only_the_training_code_imports_the_training_code():
    train = PACKAGE / "segment" / "train"
    offending = [
        f"{_module_name(p)}:{line} imports {module}"
        for p in _modules(PACKAGE) if train not in p.parents
        for module, names, line in _imports(p)
        if module.startswith("tme_pipeline.segment.train")
        or (module == "tme_pipeline.segment" and "train" in names)
    ]
    assert not offending, offending


def test_modules_take_no_private_names_from_each_other():
    # A name with a leading underscore belongs to its module, and to the private modules of
    # its own subpackage (tiling/_stitch.py takes tiling/_tasks.py's); every other module,
    # the tiled stages and the untiled reference of quantify included, reaches it only
    # through public names.
    offending = []
    for p in _modules(PACKAGE):
        here = _module_name(p)
        own = here if p.name == "__init__.py" else here.rpartition(".")[0]
        for module, names, line in _imports(p):
            if own != "tme_pipeline" and module.startswith(own + "."):
                continue
            private = [n for n in names if n.startswith("_") and not n.endswith("__")]
            if private and module.startswith("tme_pipeline"):
                offending.append(f"{here}:{line} takes {private} from {module}")
    assert not offending, offending


_RUN_PATH = textwrap.dedent("""
    import importlib, sys
    from pathlib import Path
    import tme_pipeline
    from tme_pipeline.cli import main

    # Every module outside the training subpackage (found by file: pkgutil would import
    # each package to walk it), then a StarDist segmentation as the user runs it: none of
    # it may load the training code.
    root = Path(tme_pipeline.__file__).parent
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not name.startswith("tme_pipeline.segment.train"):
            importlib.import_module(name)
    assert main(["segment", sys.argv[1], "--pixel-um", "0.5", "--method", "stardist", "--device", "cpu",
                 "--out", sys.argv[2]]) == 0
    print(" ".join(sorted(m for m in sys.modules if m.startswith("tme_pipeline.segment"))))
""")


@pytest.mark.timeout(300)
def test_the_run_path_never_imports_the_training_code(tmp_path):
    image, _ = make_nuclei((96, 96), seed=2)
    png = tmp_path / "dapi.png"
    imsave(png, (image / image.max() * 255).astype(np.uint8), check_contrast=False)
    proc = subprocess.run([sys.executable, "-c", _RUN_PATH, str(png), str(tmp_path / "nuclei.tif")],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stdout.split()
    assert "tme_pipeline.segment.predict" in loaded and "tme_pipeline.segment.weights" in loaded
    assert not [m for m in loaded if m.startswith("tme_pipeline.segment.train")]
