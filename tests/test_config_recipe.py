"""Recipe parsing and config validation: unknown keys and bad values name the field and the choices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from onnxcomp.config import from_mapping
from onnxcomp.errors import RecipeError
from onnxcomp.recipe import apply_overrides, dump_toml, parse_recipe


@dataclass(frozen=True)
class _Cfg:
    bits: int = 8
    mode: Literal["a", "b"] = "a"
    ratio: float = 0.5
    names: tuple[str, ...] = ()
    limit: float | None = None

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be in [2, 16], got {self.bits}")


def test_from_mapping_coerces_and_validates() -> None:
    cfg = from_mapping(_Cfg, {"bits": 4, "mode": "b", "ratio": 1, "names": ["x", "y"]}, where="p")
    assert cfg == _Cfg(bits=4, mode="b", ratio=1.0, names=("x", "y"))
    assert isinstance(cfg.ratio, float)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"bitz": 4}, "p: unknown option 'bitz'; valid options are: bits, limit, mode, names, ratio"),
        ({"mode": "c"}, "p.mode must be one of 'a', 'b'; got 'c'"),
        ({"bits": "8"}, "p.bits must be an integer; got '8'"),
        ({"bits": True}, "p.bits must be an integer; got True"),
        ({"bits": 1}, "bits must be in [2, 16], got 1"),
        ({"names": "x"}, "p.names must be a list of str"),
        ({"limit": "x"}, "p.limit must be float or none"),
    ],
)
def test_from_mapping_errors_name_the_field(table: dict, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        from_mapping(_Cfg, table, where="p")
    assert message in str(err.value)


def test_recipe_unknown_section_and_verify_key() -> None:
    with pytest.raises(RecipeError, match="unknown section 'passs'; valid sections are: passes"):
        parse_recipe({"passs": []})
    with pytest.raises(RecipeError, match="verify: unknown option 'min_cos'"):
        parse_recipe({"verify": {"min_cos": 0.9}})
    with pytest.raises(RecipeError, match=r"passes\[0\] needs a name"):
        parse_recipe({"passes": [{"mode": "x"}]})
    with pytest.raises(RecipeError, match="unknown pass 'nope'; available passes:"):
        parse_recipe({"passes": [{"name": "nope"}]})


def test_overrides_apply_to_sections_and_named_passes() -> None:
    data = {"passes": [{"name": "cleanup"}], "verify": {"samples": 4}}
    out = apply_overrides(
        data, ["verify.samples=16", "passes.cleanup.fold_constants=false", "output.path='x.onnx'"]
    )
    assert out["verify"]["samples"] == 16
    assert out["passes"][0]["fold_constants"] is False
    assert out["output"]["path"] == "x.onnx"
    assert data["verify"]["samples"] == 4  # the input is not modified
    with pytest.raises(RecipeError, match="the recipe has no pass 'quantize'; it has: cleanup"):
        apply_overrides(data, ["passes.quantize.bits=4"])
    with pytest.raises(RecipeError, match=r"expected section\.key=value"):
        apply_overrides(data, ["verify"])


def test_recipe_round_trips_through_toml() -> None:
    import tomllib

    recipe = parse_recipe({"passes": [{"name": "cleanup"}], "verify": {"min_cosine": 0.9}}, validate=False)
    again = parse_recipe(tomllib.loads(dump_toml(recipe.as_dict())), validate=False)
    assert again.passes == recipe.passes
    assert again.verify == recipe.verify
