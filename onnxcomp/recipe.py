"""Recipes: TOML files users keep in version control.

```toml
[[passes]]            # run in order
name = "cleanup"
[[passes]]
name = "quantize"
mode = "static-int8"
[calibration]         # where samples come from (see onnxcomp.calibration)
data = "calib.npz"
[target]              # see onnxcomp.targets
name = "ort-cpu"
[verify]              # what the written model must satisfy
min_cosine = 0.99
[output]
external_data = "auto"
[pack]                # optional packed artifact
codec = "deflate"
```

Unknown sections, unknown keys and bad values are ``RecipeError`` naming the field and the valid
choices. ``--set section.key=value`` (or ``passes.NAME.key=value``) overrides any field from the CLI.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from onnxcomp.config import config_to_dict, from_mapping
from onnxcomp.errors import RecipeError
from onnxcomp.pass_base import Pass, create_pass

__all__ = [
    "OutputConfig",
    "PassSpec",
    "Recipe",
    "VerifyConfig",
    "apply_overrides",
    "builtin_recipes",
    "load_recipe",
    "parse_recipe",
]

SECTIONS = ("passes", "calibration", "target", "verify", "output", "pack", "evaluation", "description")


@dataclass(frozen=True)
class VerifyConfig:
    """Checks on the written model. Lossless pipelines must match within ``rtol``/``atol``; lossy ones
    must keep at least ``min_cosine`` per output and ``min_top1_agreement`` on classifier outputs."""

    enabled: bool = True
    samples: int = 8
    seed: int = 0
    rtol: float = 1e-4
    atol: float = 1e-5
    min_cosine: float = 0.98
    min_top1_agreement: float = 0.0
    max_slowdown: float | None = None

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"verify.samples must be >= 1, got {self.samples}")
        if not 0.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"verify.min_cosine must be in [0, 1], got {self.min_cosine}")
        if not 0.0 <= self.min_top1_agreement <= 1.0:
            raise ValueError(f"verify.min_top1_agreement must be in [0, 1], got {self.min_top1_agreement}")


@dataclass(frozen=True)
class OutputConfig:
    """Where and how the model is written."""

    path: str | None = None
    external_data: Literal["auto", "always", "never"] = "auto"
    external_data_over_mb: float = 1024.0


@dataclass(frozen=True)
class PassSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    passes: tuple[PassSpec, ...] = ()
    calibration: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    pack: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    source: str | None = None

    def build_passes(self) -> list[Pass]:
        return [create_pass(spec.name, spec.options) for spec in self.passes]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.description:
            out["description"] = self.description
        out["passes"] = [{"name": s.name, **s.options} for s in self.passes]
        for key in ("calibration", "target", "pack", "evaluation"):
            if getattr(self, key):
                out[key] = dict(getattr(self, key))
        out["verify"] = config_to_dict(self.verify)
        out["output"] = {k: v for k, v in config_to_dict(self.output).items() if v is not None}
        return out

    def to_toml(self) -> str:
        return dump_toml(self.as_dict())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} to TOML")


def dump_toml(data: dict[str, Any]) -> str:
    """Minimal TOML writer for recipes (tables, arrays of tables, scalars, lists, inline tables)."""
    lines: list[str] = []
    for key, value in data.items():
        if not isinstance(value, (dict, list)) or (isinstance(value, list) and key != "passes"):
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in data.items():
        if key == "passes":
            for entry in value:
                lines += ["", "[[passes]]"] + [
                    f"{k} = {_toml_value(v)}" for k, v in entry.items() if v is not None
                ]
        elif isinstance(value, dict):
            lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None]
    return "\n".join(lines).lstrip("\n") + "\n"


def parse_recipe(data: dict[str, Any], *, source: str | None = None, validate: bool = True) -> Recipe:
    """Build a Recipe from a parsed TOML document; pass options are validated eagerly."""
    where = source or "recipe"
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise RecipeError(
            f"{where}: unknown section {unknown[0]!r}; valid sections are: {', '.join(SECTIONS)}"
        )
    raw_passes = data.get("passes", [])
    if not isinstance(raw_passes, list):
        raise RecipeError(f"{where}: 'passes' must be an array of tables ([[passes]])")
    specs = []
    for i, table in enumerate(raw_passes):
        if not isinstance(table, dict) or "name" not in table:
            raise RecipeError(f'{where}: passes[{i}] needs a name, e.g. name = "cleanup"')
        options = {k: v for k, v in table.items() if k != "name"}
        specs.append(PassSpec(str(table["name"]), options))
    for key in ("calibration", "target", "pack", "evaluation"):
        if key in data and not isinstance(data[key], dict):
            raise RecipeError(f"{where}: [{key}] must be a table")
    recipe = Recipe(
        passes=tuple(specs),
        calibration=dict(data.get("calibration", {})),
        target=dict(data.get("target", {})),
        verify=from_mapping(VerifyConfig, data.get("verify", {}), where="verify"),
        output=from_mapping(OutputConfig, data.get("output", {}), where="output"),
        pack=dict(data.get("pack", {})),
        evaluation=dict(data.get("evaluation", {})),
        description=str(data.get("description", "")),
        source=source,
    )
    if validate:
        for i, spec in enumerate(recipe.passes):
            try:
                create_pass(spec.name, spec.options)
            except RecipeError as exc:
                raise RecipeError(f"{where}: passes[{i}] {exc}") from exc
    return recipe


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (``passes.NAME.key=value`` for a pass) to a raw recipe."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected section.key=value, e.g. verify.min_cosine=0.99")
        dotted, _, raw = item.partition("=")
        parts = dotted.strip().split(".")
        value = _parse_value(raw.strip())
        if parts[0] == "passes":
            if len(parts) != 3:
                raise RecipeError(f"--set {item!r}: expected passes.NAME.key=value")
            matches = [p for p in data.get("passes", []) if p.get("name") == parts[1]]
            if not matches:
                names = ", ".join(p.get("name", "?") for p in data.get("passes", [])) or "(none)"
                raise RecipeError(f"--set {item!r}: the recipe has no pass {parts[1]!r}; it has: {names}")
            for table in matches:
                table[parts[2]] = value
            continue
        if len(parts) != 2 or parts[0] not in SECTIONS:
            raise RecipeError(
                f"--set {item!r}: expected SECTION.key=value with SECTION one of {', '.join(SECTIONS[1:-1])}"
            )
        data.setdefault(parts[0], {})[parts[1]] = value
    return data


def builtin_recipes() -> dict[str, Path]:
    """Recipes shipped with onnxcomp, by name (``--recipe safe-int8``)."""
    folder = Path(__file__).with_name("recipes")
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def read_recipe_data(path_or_name: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    path = Path(path_or_name)
    if not path.exists():
        builtin = builtin_recipes()
        if str(path_or_name) in builtin:
            path = builtin[str(path_or_name)]
        else:
            names = ", ".join(builtin) or "(none)"
            raise RecipeError(f"{path}: no such recipe file; built-in recipes are: {names}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")), str(path)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc})") from exc


def load_recipe(path_or_name: str | os.PathLike[str], overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file (or a built-in recipe by name) and apply ``--set`` overrides."""
    data, source = read_recipe_data(path_or_name)
    return parse_recipe(apply_overrides(data, overrides or []), source=source)
