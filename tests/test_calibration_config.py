"""The [calibration] recipe table: defaults, validation messages naming the field, round trip."""

from __future__ import annotations

import pytest

from onnxcomp.calibration.config import CalibrationConfig
from onnxcomp.config import config_to_dict, from_mapping
from onnxcomp.errors import RecipeError


def test_defaults_and_table() -> None:
    cfg = CalibrationConfig()
    assert (cfg.kind, cfg.holdout, cfg.observer, cfg.layout) == ("auto", 8, "minmax", "NCHW")
    table = {
        "data": "imgs",
        "resize": [256],
        "center_crop": [224, 224],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "scale": 0.00392156862745098,
        "observer": "percentile",
        "percentile": 99.99,
        "shapes": {"x": [1, 3, "H", 224]},
    }
    cfg = from_mapping(CalibrationConfig, table, where="calibration")
    assert cfg.resize == (256,) and cfg.center_crop == (224, 224)
    assert cfg.shape_overrides == {"x": (1, 3, "H", 224)}
    assert cfg.observer_options() == {"percentile": 99.99}
    hash(cfg)  # frozen and hashable
    again = from_mapping(CalibrationConfig, config_to_dict(cfg), where="calibration")
    assert again == cfg


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"kind": "csv"}, "calibration.kind must be one of"),
        ({"observer": "kl"}, "calibration.observer must be one of"),
        ({"max_samples": 0}, "max_samples must be >= 1"),
        ({"holdout": -1}, "holdout must be >= 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"function": "f.py:g"}, 'function is only used with kind = "function"'),
        ({"kind": "function"}, 'needs function = "file.py:fn"'),
        ({"kind": "npz"}, 'kind = "npz" needs data = PATH'),
        ({"resize": [1, 2, 3]}, "resize must be"),
        ({"center_crop": [0]}, "center_crop must be"),
        ({"layout": "CHW"}, "calibration.layout must be one of"),
        ({"scale": 0}, "scale must be > 0"),
        ({"std": [1.0, 0.0]}, "std must be positive"),
        ({"percentile": 40.0}, "percentile must be in"),
        ({"shapes": {"x": "1,3"}}, "shapes must map input names"),
        ({"shapes": {"x": [1, -3]}}, "dims must be integers >= 0"),
        ({"bogus": 1}, "unknown option 'bogus'"),
    ],
)
def test_bad_values_name_the_field(table: dict, match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        from_mapping(CalibrationConfig, table, where="calibration")


def test_function_kind_accepts_data_reference() -> None:
    cfg = CalibrationConfig(kind="function", data="gen.py:samples")
    assert cfg.function is None and cfg.data == "gen.py:samples"
