"""The original configuration system: defaults, YAML files, KEY VALUE overrides, type rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

import nonlocal_net as nl
from nonlocal_net.core.config import (
    ConfigError,
    ConfigKeyError,
    ConfigTypeError,
    assert_and_infer_cfg,
    cfg_from_file,
    cfg_from_list,
    get_default_cfg,
)
from nonlocal_net.core.zoo import BASE_CONFIGS


def test_defaults_are_the_originals():
    cfg = get_default_cfg()
    # a sample across every section, including the easy-to-miss ones
    assert cfg.TRAIN.VIDEO_LENGTH == 32 and cfg.TRAIN.SAMPLE_RATE == 2
    assert cfg.TRAIN.JITTER_SCALES == [256, 480]
    assert cfg.MODEL.BN_EPSILON == 1.0000001e-5 and cfg.MODEL.BN_MOMENTUM == 0.9
    assert cfg.MODEL.BN_INIT_GAMMA == 1.0 and isinstance(cfg.MODEL.BN_INIT_GAMMA, float)
    assert cfg.MODEL.MEAN == 114.75 and cfg.MODEL.STD == 57.375
    assert cfg.MODEL.NUM_CLASSES == -1 and cfg.MODEL.MODEL_NAME == ""
    assert cfg.RESNETS.TRANS_FUNC == "bottleneck_transformation"
    assert cfg.TEST.OUTPUT_NAME == "pred" and cfg.TEST.NUM_TEST_CLIPS == 10
    assert cfg.SOLVER.STEPS is None and cfg.SOLVER.WARMUP.WARMUP_END_ITER == 25025
    assert cfg.NONLOCAL.NO_BIAS == 0 and type(cfg.NONLOCAL.NO_BIAS) is int
    assert cfg.NONLOCAL.BN_INIT_GAMMA == 0.0 and cfg.NONLOCAL.LAYER_MOD == 2
    assert cfg.NUM_GPUS == 8 and cfg.RNG_SEED == 2
    assert set(cfg) >= {
        "TRAIN",
        "MODEL",
        "RESNETS",
        "TEST",
        "SOLVER",
        "CHECKPOINT",
        "NONLOCAL",
        "METRICS",
        "DATALOADER",
    }


def test_defaults_are_not_shared_between_calls():
    a = get_default_cfg()
    a.TRAIN.JITTER_SCALES.append(999)
    assert get_default_cfg().TRAIN.JITTER_SCALES == [256, 480]


@pytest.mark.parametrize("name", sorted(BASE_CONFIGS))
def test_every_original_yaml_loads(original_config_files, name):
    cfg = get_default_cfg()
    cfg_from_file(cfg, original_config_files[name])
    expected = yaml.safe_load(original_config_files[name].read_text())
    for section, values in expected.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if isinstance(value, dict):
                    for sub, v in value.items():
                        assert cfg[section][key][sub] == v
                else:
                    assert cfg[section][key] == value, f"{section}.{key}"
        else:
            assert cfg[section] == values
    # the number written 1.0000001e-5 stays a float, and 'steps_with_relative_lrs' a str
    assert isinstance(cfg.MODEL.BN_EPSILON, float)
    assert cfg.SOLVER.LR_POLICY == "steps_with_relative_lrs"


@pytest.mark.parametrize("name", sorted(BASE_CONFIGS))
def test_zoo_base_configs_equal_the_original_files(original_config_files, name):
    from_file = get_default_cfg()
    cfg_from_file(from_file, original_config_files[name])
    from_zoo = get_default_cfg()
    path = original_config_files[name].parent / "zoo.yaml"
    path.write_text(yaml.safe_dump(BASE_CONFIGS[name]))
    cfg_from_file(from_zoo, path)
    assert from_file == from_zoo


_ORIGINAL_DIR = os.environ.get("VNL_ORIGINAL_CONFIGS")


@pytest.mark.skipif(not _ORIGINAL_DIR, reason="set VNL_ORIGINAL_CONFIGS to a checkout's configs/")
def test_files_from_an_original_checkout_load():
    files = sorted(Path(_ORIGINAL_DIR).glob("*.yaml"))
    assert files
    for path in files:
        cfg = get_default_cfg()
        cfg_from_file(cfg, path)
        assert cfg.MODEL.NUM_CLASSES == 400


def test_overrides_apply_with_literal_eval():
    cfg = get_default_cfg()
    cfg_from_list(
        cfg,
        [
            "MODEL.DEPTH",
            "101",
            "MODEL.MODEL_NAME",
            "resnet_video_org",
            "TRAIN.JITTER_SCALES",
            "[256, 320]",
            "TRAIN.DROPOUT_RATE",
            "0.5",
            "NONLOCAL.CONV3_NONLOCAL",
            "False",
            "SOLVER.WARMUP.WARMUP_ON",
            "True",
            "TRAIN.PARAMS_FILE",
            "../data/pretrained_model/r50.pkl",
        ],
    )
    assert cfg.MODEL.DEPTH == 101 and cfg.MODEL.MODEL_NAME == "resnet_video_org"
    assert cfg.TRAIN.JITTER_SCALES == [256, 320] and cfg.TRAIN.DROPOUT_RATE == 0.5
    assert cfg.NONLOCAL.CONV3_NONLOCAL is False and cfg.SOLVER.WARMUP.WARMUP_ON is True
    assert cfg.TRAIN.PARAMS_FILE == "../data/pretrained_model/r50.pkl"


def test_override_type_rules_are_the_originals():
    cfg = get_default_cfg()
    # isinstance rule: a bool is an int, so True is accepted for NO_BIAS (an int key) ...
    cfg_from_list(cfg, ["NONLOCAL.NO_BIAS", "True"])
    assert cfg.NONLOCAL.NO_BIAS is True
    # ... but an int is not a float
    with pytest.raises(ConfigTypeError, match=r"MODEL\.BN_INIT_GAMMA"):
        cfg_from_list(cfg, ["MODEL.BN_INIT_GAMMA", "0"])
    # a key whose default is None takes anything
    cfg_from_list(cfg, ["SOLVER.STEPS", "[0, 10, 20]"])
    assert cfg.SOLVER.STEPS == [0, 10, 20]


@pytest.mark.parametrize(
    "pairs, key",
    [
        (["MODEL.DEPTH", "deep"], "MODEL.DEPTH"),
        (["TRAIN.JITTER_SCALES", "256"], "TRAIN.JITTER_SCALES"),
        (["NONLOCAL.USE_BN", "1"], "NONLOCAL.USE_BN"),
        (["MODEL.MODEL_NAME", "3"], "MODEL.MODEL_NAME"),
    ],
)
def test_override_type_mismatch_names_the_key(pairs, key):
    with pytest.raises(ConfigTypeError, match=key.replace(".", r"\.")):
        cfg_from_list(get_default_cfg(), pairs)


@pytest.mark.parametrize(
    "key", ["MODEL.DEPTHH", "NONLOCAL.USE_GAUSSIAN", "FOO", "MODEL.DEPTH.X", "SOLVER.WARMUP.NOPE"]
)
def test_unknown_override_key_names_the_key(key):
    with pytest.raises(ConfigKeyError, match=key.replace(".", r"\.")) as info:
        cfg_from_list(get_default_cfg(), [key, "1"])
    assert isinstance(info.value, KeyError) and isinstance(info.value, ConfigError)


def test_section_cannot_be_overridden_by_a_value():
    with pytest.raises(ConfigTypeError, match="'MODEL' is a section"):
        cfg_from_list(get_default_cfg(), ["MODEL", "1"])


def test_odd_override_list():
    with pytest.raises(ConfigError, match="odd number"):
        cfg_from_list(get_default_cfg(), ["MODEL.DEPTH"])


def test_yaml_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("MODEL:\n  DEPTH: 50\n  USE_NONLOCAL: True\n")
    with pytest.raises(ConfigKeyError, match=r"bad\.yaml.*MODEL\.USE_NONLOCAL"):
        cfg_from_file(get_default_cfg(), path)


@pytest.mark.parametrize(
    "text, key",
    [
        ("MODEL:\n  BN_INIT_GAMMA: 0\n", "MODEL.BN_INIT_GAMMA"),  # int where float
        ("NONLOCAL:\n  NO_BIAS: True\n", "NONLOCAL.NO_BIAS"),  # bool where int (exact type rule)
        ("TRAIN:\n  CROP_SIZE: '224'\n", None),  # a quoted number is literal_eval-ed: accepted
        ("SOLVER:\n  STEPS: [0, 1]\n", "SOLVER.STEPS"),  # None default cannot be set from a file
        ("TRAIN: 5\n", "TRAIN"),
        ("NUM_GPUS:\n  A: 1\n", "NUM_GPUS"),
    ],
)
def test_yaml_type_rules_are_the_originals(tmp_path, text, key):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    if key is None:
        cfg = cfg_from_file(get_default_cfg(), path)
        assert cfg.TRAIN.CROP_SIZE == 224
        return
    with pytest.raises(ConfigTypeError, match=key.replace(".", r"\.")):
        cfg_from_file(get_default_cfg(), path)


def test_yaml_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        cfg_from_file(get_default_cfg(), tmp_path / "missing.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("MODEL: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not a valid YAML"):
        cfg_from_file(get_default_cfg(), bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        cfg_from_file(get_default_cfg(), listy)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert cfg_from_file(get_default_cfg(), empty) == get_default_cfg()


def test_assert_and_infer_cfg():
    cfg = get_default_cfg()
    cfg_from_list(cfg, ["SOLVER.STEP_SIZES", "[150000, 150000, 100000]"])
    assert_and_infer_cfg(cfg)
    assert cfg.SOLVER.STEPS == [0, 150000, 300000, 400000]
    bad = get_default_cfg()
    cfg_from_list(bad, ["TEST.BATCH_SIZE", "30"])
    with pytest.raises(ConfigError, match=r"TEST\.BATCH_SIZE \(30\).*NUM_GPUS \(8\)"):
        assert_and_infer_cfg(bad)


def test_get_cfg_sources(original_config_files):
    path = original_config_files["DBG_kinetics_resnet_8gpu_c2d_nonlocal_400k.yaml"]
    cfg = nl.get_cfg(path, ["MODEL.VIDEO_ARC_CHOICE", "2"])
    assert cfg.MODEL.VIDEO_ARC_CHOICE == 2 and cfg.SOLVER.STEPS == [0, 150000, 300000, 400000]
    assert cfg.is_frozen()
    zoo = nl.get_cfg("i3d_nonlocal_8x8_IN_pretrain_400k", ["MODEL.DEPTH", "101"])
    assert zoo.MODEL.DEPTH == 101 and zoo.MODEL.VIDEO_ARC_CHOICE == 2
    again = nl.get_cfg(zoo, ["TRAIN.VIDEO_LENGTH", "16"])
    assert again.TRAIN.VIDEO_LENGTH == 16 and zoo.TRAIN.VIDEO_LENGTH == 8
    assert nl.get_cfg().MODEL.NUM_CLASSES == -1
    with pytest.raises(KeyError, match="did you mean i3d_nonlocal_8x8_IN_pretrain_400k"):
        nl.get_cfg("i3d_nonlocal_8x8_IN_pretrain_400")
    with pytest.raises(ConfigError, match="cannot read config file"):
        nl.get_cfg("no/such/file.yaml")
