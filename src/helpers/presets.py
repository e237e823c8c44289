"""Presets: the papermill parameter files in `params/*.yaml`, and the paths they name.

A preset is a flat mapping of notebook parameters (`family`, `n_tokens`, `device`, ...) plus two
nested blocks used by the embedded seed family (`corpus`, `embedded`). The same file drives the
notebooks (`papermill ... -f params/<name>.yaml`) and the command-line jobs
(`python -m helpers.train --preset <name>`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

PRESET_ENV = "UNIVERSAL_NEURONS_PARAMS"


def repo_root() -> Path:
    """The repository root: the nearest parent of this file (or of the cwd) holding `params/`."""
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for parent in (start, *start.parents):
            if (parent / "params").is_dir() and (parent / "_config.yml").is_file():
                return parent
    return Path.cwd().resolve()


def params_dir() -> Path:
    return repo_root() / "params"


def available_presets() -> list[str]:
    return sorted(p.stem for p in params_dir().glob("*.yaml"))


def preset_path(name_or_path: str | os.PathLike) -> Path:
    """Resolve a preset name (`smoke`) or a path (`params/smoke.yaml`) to an existing file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if p.is_file():
            return p
        if (repo_root() / p).is_file():
            return repo_root() / p
        raise FileNotFoundError(f"preset file {str(p)!r} does not exist")
    candidate = params_dir() / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(
        f"unknown preset {str(name_or_path)!r}; known presets: {', '.join(available_presets())} "
        f"(or pass a path to a .yaml file)"
    )


def load_preset(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """Read a preset into a dict. Raises a clear error for a missing file or a non-mapping file."""
    path = preset_path(name_or_path)
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"preset {path} must be a YAML mapping of parameter names to values")
    data.setdefault("preset", path.stem)
    return data


def resolve_dir(path: str | os.PathLike) -> Path:
    """A relative directory is taken relative to the repository root, so notebooks executed from
    any working directory (papermill, nbmake, Colab) share one artifacts folder."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = repo_root() / p
    p.mkdir(parents=True, exist_ok=True)
    return p
