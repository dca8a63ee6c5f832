"""The original project's configuration system, on top of yacs.

Every key of the original ``lib/core/config.py`` exists here with its original default (byte
strings became ``str``), so the original YAML files load unchanged and the original command-line
``KEY VALUE`` overrides work. The merge rules are the original's, which are stricter than yacs'
own:

* A key that is not in the defaults is an error (:class:`ConfigKeyError`) naming the full key.
* From a YAML file, a string value is first passed through :func:`ast.literal_eval`; the result
  must then have *exactly* the type of the default (``int`` is not ``float``, ``bool`` is not
  ``int``), except that ``None`` may replace anything. A key whose default is ``None``
  (``SOLVER.STEPS``) cannot be set from a file, as in the original.
* From a ``KEY VALUE`` list, the value is ``literal_eval``-ed (falling back to the raw string) and
  must be an *instance* of the default's type (so ``True`` is accepted for an ``int`` key, ``1``
  is not accepted for a ``float`` key); a key whose default is ``None`` takes any value.

Type errors are :class:`ConfigTypeError` naming the key, the expected and the given type.
:func:`assert_and_infer_cfg` then derives ``SOLVER.STEPS`` and checks the batch sizes, as the
original does before building a model.

Every config the project hands out is made by one sequence, :func:`build_cfg` (clone the base or
the defaults, unfreeze, merge a mapping / a YAML file / ``KEY VALUE`` overrides, infer, freeze);
:func:`get_cfg` is its public face (zoo name, YAML path, config or ``None``), and
:func:`cfg_to_dict` / :func:`cfg_from_dict` are the plain-dict round-trip that weights files store.
"""

from __future__ import annotations

import ast
import copy
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from yacs.config import CfgNode

from .zoo import ZOO, get_zoo_entry

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_DEPTH",
    "MAX_CONFIG_ITEMS",
    "MAX_MODEL_PARAMETERS",
    "CfgLike",
    "ConfigError",
    "ConfigKeyError",
    "ConfigTypeError",
    "assert_and_infer_cfg",
    "build_cfg",
    "cfg_from_dict",
    "cfg_from_file",
    "cfg_from_list",
    "cfg_from_mapping",
    "cfg_to_dict",
    "check_structure",
    "estimated_parameters",
    "get_cfg",
    "get_default_cfg",
    "validate_model_cfg",
]

# Bounds on anything read as a config (a YAML file, a converted file's stored config): the
# original's configs are a few KB, 3 levels deep, with a few hundred values.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 16
MAX_CONFIG_ITEMS = 10_000
# Largest model a config may imply before anything is allocated (8 GB of float32 weights; the
# largest released network, I3D R101 non-local, has about 62 M).
MAX_MODEL_PARAMETERS = 2_000_000_000


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and the file, where there is one)."""


class ConfigKeyError(ConfigError, KeyError):
    """A key that does not exist in the original configuration."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigTypeError(ConfigError, TypeError):
    """A value whose type does not match the default's type under the original's rules."""


def _node(**entries: Any) -> CfgNode:
    return CfgNode(entries)


def _defaults() -> CfgNode:
    """Build the original defaults. Comments give the original's meaning where it is not obvious."""
    c = CfgNode()
    c.DEBUG = False

    c.DATALOADER = _node(MAX_BAD_IMAGES=100)

    c.TRAIN = _node(
        PARAMS_FILE="",
        DATA_TYPE="train",
        BATCH_SIZE=64,  # global batch; the per-GPU batch is BATCH_SIZE / NUM_GPUS
        MEM_CACHE=False,
        RESUME_FROM_BATCH_SIZE=-1,
        RESET_START_ITER=False,
        JITTER_SCALES=[256, 480],  # JITTER_SCALES[0] is also the fully-convolutional test crop
        CROP_SIZE=224,
        COMPUTE_PRECISE_BN=True,
        ITER_COMPUTE_PRECISE_BN=200,
        EVAL_PERIOD=5005,
        DATASET_SIZE=234643,
        VIDEO_LENGTH=32,  # clip length; also sets the pool5 temporal kernel and the test clips
        SAMPLE_RATE=2,
        DROPOUT_RATE=0.0,
        TEST_AFTER_TRAIN=False,
    )

    c.MODEL = _node(
        NUM_CLASSES=-1,
        MODEL_NAME="",  # 'resnet_video' or 'resnet_video_org'
        VIDEO_ARC_CHOICE=1,  # 1: C2D R50, 2: I3D R50, 3: C2D R101, 4: I3D R101
        DEPTH=50,
        BN_MOMENTUM=0.9,  # Caffe2 convention: running = running * 0.9 + batch * 0.1
        BN_EPSILON=1.0000001e-5,
        BN_INIT_GAMMA=1.0,  # initial gamma of every branch2c BN
        FC_INIT_STD=0.01,
        MEAN=114.75,
        STD=57.375,
        ALLOW_INPLACE_SUM=True,
        ALLOW_INPLACE_RELU=True,
        ALLOW_INPLACE_RESHAPE=True,
        MEMONGER=True,
        USE_BGR=False,
        USE_AFFINE=False,  # every BN becomes a frozen per-channel affine; res3 non-local grouped
        SAMPLE_THREADS=8,
    )

    c.RESNETS = _node(
        NUM_GROUPS=1,
        WIDTH_PER_GROUP=64,
        STRIDE_1X1=False,  # present in the original but never read
        TRANS_FUNC="bottleneck_transformation",
    )

    c.TEST = _node(
        PARAMS_FILE="",
        DATA_TYPE="",
        BATCH_SIZE=64,
        TEN_CROP=False,
        SCALE=256,
        CROP_SIZE=224,  # unused by the fully-convolutional test
        OUTPUT_NAME="pred",
        TEST_FULLY_CONV=False,
        TEST_FULLY_CONV_FLIP=False,
        GLOBAL_AVE=False,
        DATASET_SIZE=19761,
        VIDEO_LENGTH=32,  # never read by the original: TRAIN.VIDEO_LENGTH is used at test time
        SAMPLE_RATE=2,  # never read, likewise
        NUM_TEST_CLIPS=10,
        USE_MULTI_CROP=0,
    )

    c.SOLVER = _node(
        NESTEROV=True,
        WEIGHT_DECAY=0.0001,
        WEIGHT_DECAY_BN=0.0001,
        MOMENTUM=0.9,
        LR_POLICY="steps_with_relative_lrs",
        BASE_LR=0.1,
        STEP_SIZES=[150150, 150150, 150150],
        LRS=[1, 0.1, 0.01],
        MAX_ITER=500500,
        STEPS=None,  # derived from STEP_SIZES by assert_and_infer_cfg
        GAMMA=0.1,
        SCALE_MOMENTUM=False,
        WARMUP=_node(WARMUP_ON=False, WARMUP_START_LR=0.1, WARMUP_END_ITER=5005 * 5),
    )

    c.CHECKPOINT = _node(CHECKPOINT_MODEL=True, CHECKPOINT_PERIOD=-1, RESUME=True, DIR=".")

    c.NONLOCAL = _node(
        CONV_INIT_STD=0.01,
        NO_BIAS=0,
        USE_MAXPOOL=True,
        USE_SOFTMAX=True,
        USE_ZERO_INIT_CONV=False,
        USE_BN=True,
        USE_SCALE=True,
        USE_AFFINE=False,
        BN_MOMENTUM=0.9,
        BN_EPSILON=1.0000001e-5,
        BN_INIT_GAMMA=0.0,
        LAYER_MOD=2,
        CONV3_NONLOCAL=True,
        CONV4_NONLOCAL=True,
    )

    c.METRICS = _node(EVAL_FIRST_N=False, FIRST_N=1000)

    c.DATADIR_TRAIN_TIME = "kinetics/alllist"
    c.DATADIR_TEST_TIME = "data/kinetics/kinetics_lmdb_gfsai"
    c.FILENAME_GT = "data/kinetics/val_all_list.txt"
    c.DATADIR = ""
    c.DATASET = ""
    c.ROOT_GPU_ID = 0
    c.CUDNN_WORKSPACE_LIMIT = 256
    c.RNG_SEED = 2
    c.NUM_GPUS = 8
    c.VIDEO_DECODER_THREADS = 4
    c.OUTPUT_DIR = "gen"
    c.LOG_PERIOD = 10
    c.PROF_DAG = False
    return c


_DEFAULTS = _defaults()


def get_default_cfg() -> CfgNode:
    """Return a fresh, mutable copy of the original defaults."""
    return _DEFAULTS.clone()


def _literal(value: Any) -> Any:
    """The original's string decoding: ``literal_eval`` if it parses, else the string itself."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return value
    return value


def _type_name(value: Any) -> str:
    return type(value).__name__


def _merge_mapping(cfg: CfgNode, data: Mapping, prefix: str, source: str) -> None:
    """Merge a YAML mapping into ``cfg`` with the original file rules (exact type match)."""
    for key, raw in data.items():
        full_key = f"{prefix}{key}"
        if not isinstance(key, str) or key not in cfg:
            raise ConfigKeyError(f"{source}: unknown config key {full_key!r}")
        default = cfg[key]
        if isinstance(raw, Mapping):
            if not isinstance(default, CfgNode):
                raise ConfigTypeError(
                    f"{source}: config key {full_key!r} is a value, not a section "
                    f"(got a mapping, expected {_type_name(default)})"
                )
            _merge_mapping(default, raw, full_key + ".", source)
            continue
        if isinstance(default, CfgNode):
            raise ConfigTypeError(
                f"{source}: config key {full_key!r} is a section; got a {_type_name(raw)} value"
            )
        value = _literal(raw)
        if value is not None and type(value) is not type(default):
            raise ConfigTypeError(
                f"{source}: type mismatch for config key {full_key!r}: expected "
                f"{_type_name(default)} (default {default!r}), got {_type_name(value)} ({value!r})"
            )
        cfg[key] = copy.deepcopy(value)


def cfg_from_mapping(cfg: CfgNode, data: Mapping, source: str = "<mapping>") -> CfgNode:
    """Merge a nested mapping (as a YAML file holds it) into ``cfg`` in place, with the original
    file rules (unknown keys are errors, exact type match); ``source`` names it in errors."""
    _merge_mapping(cfg, data, "", source)
    return cfg


def check_structure(
    value: Any,
    source: str,
    *,
    max_depth: int = MAX_CONFIG_DEPTH,
    max_items: int = MAX_CONFIG_ITEMS,
    children: Any = None,
) -> int:
    """Refuse a nested structure (dicts/lists, or YAML nodes) that is deeper than ``max_depth``
    or holds more than ``max_items`` values once every shared part is counted at each place it
    is used (what any later copy or dump would produce). Each shared part is measured once, so
    this check itself is linear in the size of the input. Returns the expanded item count.

    ``children(value)`` lists a value's parts (default: dict values and list/tuple items).
    """
    if children is None:

        def children(v: Any) -> Any:
            if isinstance(v, Mapping):
                return list(v.values())
            if isinstance(v, (list, tuple)):
                return v
            return ()

    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(v: Any, depth: int) -> int:
        parts = children(v)
        if not parts:
            return 1
        key = id(v)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{source}: the config contains itself (a reference cycle)")
        if depth > max_depth:
            raise ConfigError(f"{source}: the config is nested more than {max_depth} levels deep")
        active.add(key)
        total = 1
        for part in parts:
            total += size(part, depth + 1)
            if total > max_items:
                raise ConfigError(
                    f"{source}: the config holds more than {max_items} values (counting shared "
                    f"parts, e.g. YAML anchors or pickle references, at every use)"
                )
        active.discard(key)
        sizes[key] = total
        return total

    return size(value, 0)


def _yaml_children(node: Any) -> Any:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return node.value
    return ()


def cfg_from_file(cfg: CfgNode, filename: str | os.PathLike) -> CfgNode:
    """Merge an original-format YAML config file into ``cfg`` (in place) and return ``cfg``.

    The file is bounded before it is built: at most :data:`MAX_CONFIG_BYTES`, and its node graph
    (anchors and merge keys counted at every use) at most :data:`MAX_CONFIG_ITEMS` values
    :data:`MAX_CONFIG_DEPTH` deep, so an alias bomb is refused in milliseconds."""
    path = os.fspath(filename)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: a config file of more than {MAX_CONFIG_BYTES} bytes")
    try:
        loader = yaml.SafeLoader(raw.decode("utf-8"))
        try:
            node = loader.get_single_node()
            if node is not None:
                check_structure(node, path, children=_yaml_children)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not a valid YAML file: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: a config file must hold a mapping, got {_type_name(data)}")
    return cfg_from_mapping(cfg, data, path)


def cfg_from_list(cfg: CfgNode, args: Sequence[Any], source: str = "overrides") -> CfgNode:
    """Apply ``KEY VALUE`` pairs (as on the original command line) to ``cfg`` in place."""
    args = list(args)
    if len(args) % 2 != 0:
        raise ConfigError(
            f"{source}: expected KEY VALUE pairs, got an odd number of items ({len(args)}): "
            f"{args[-1]!r} has no value"
        )
    for key, raw in zip(args[0::2], args[1::2]):
        if not isinstance(key, str):
            raise ConfigKeyError(f"{source}: config keys must be strings, got {key!r}")
        node = cfg
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, CfgNode) or part not in node:
                raise ConfigKeyError(f"{source}: unknown config key {key!r}")
            if depth < len(parts) - 1:
                node = node[part]
        leaf = parts[-1]
        default = node[leaf]
        if isinstance(default, CfgNode):
            raise ConfigTypeError(f"{source}: config key {key!r} is a section, not a value")
        value = _literal(raw)
        if default is not None and not isinstance(value, type(default)):
            raise ConfigTypeError(
                f"{source}: type mismatch for config key {key!r}: expected "
                f"{_type_name(default)} (default {default!r}), got {_type_name(value)} ({value!r})"
            )
        node[leaf] = copy.deepcopy(value)
    return cfg


def assert_and_infer_cfg(cfg: CfgNode) -> CfgNode:
    """Derive ``SOLVER.STEPS`` and check the batch sizes, as the original does before building.

    ``SOLVER.STEP_SIZES [a, b, c]`` becomes ``SOLVER.STEPS [0, a, a+b, a+b+c]``.
    """
    _check_values(cfg)
    if cfg.SOLVER.STEPS is None:
        steps = [0]
        for size in cfg.SOLVER.STEP_SIZES:
            steps.append(steps[-1] + size)
        cfg.SOLVER.STEPS = steps
    if cfg.TEST.TEN_CROP:
        raise ConfigError("TEST.TEN_CROP is deprecated in the original and is not supported")
    if cfg.NUM_GPUS <= 0:
        raise ConfigError(f"NUM_GPUS must be positive, got {cfg.NUM_GPUS}")
    for key in ("TRAIN", "TEST"):
        if cfg[key].BATCH_SIZE % cfg.NUM_GPUS != 0:
            raise ConfigError(
                f"{key}.BATCH_SIZE ({cfg[key].BATCH_SIZE}) must be a multiple of NUM_GPUS "
                f"({cfg.NUM_GPUS})"
            )
    return cfg


def build_cfg(
    base: CfgNode | None = None,
    *,
    mapping: Mapping | None = None,
    mapping_source: str = "<mapping>",
    yaml_file: str | os.PathLike | None = None,
    overrides: Sequence[Any] = (),
) -> CfgNode:
    """The one way a config is made: a copy of ``base`` (the original defaults when ``None``),
    then ``mapping``, then the YAML file, then the ``KEY VALUE`` ``overrides`` merged in that
    order, ``SOLVER.STEPS`` inferred and the batch sizes checked; returned frozen. ``base`` is
    not changed."""
    cfg = get_default_cfg() if base is None else base.clone()
    cfg.defrost()
    if mapping is not None:
        cfg_from_mapping(cfg, mapping, mapping_source)
    if yaml_file is not None:
        cfg_from_file(cfg, yaml_file)
    cfg_from_list(cfg, list(overrides))
    assert_and_infer_cfg(cfg)
    cfg.freeze()
    return cfg


CfgLike = CfgNode | str | os.PathLike


def get_cfg(source: CfgLike | None = None, overrides: Sequence[str] = ()) -> CfgNode:
    """Return a frozen config.

    ``source`` is a zoo name (``"i3d_nonlocal_8x8_IN_pretrain_400k"``, the released file name
    without ``.pkl``), the path of an original-format YAML file, an existing config (copied), or
    ``None`` for the bare original defaults. ``overrides`` are ``KEY VALUE`` pairs as on the
    original command line, e.g. ``["MODEL.DEPTH", "101"]``. A zoo name gives the released
    network's effective config: defaults <- its YAML's values <- its script's overrides <-
    ``overrides``.
    """
    if source is None or isinstance(source, CfgNode):
        return build_cfg(source, overrides=overrides)
    text = os.fspath(source)
    if text in ZOO or (not os.path.exists(text) and not text.endswith((".yaml", ".yml"))):
        entry = get_zoo_entry(text)
        return build_cfg(
            mapping=entry.base_config(),
            mapping_source=f"<zoo config {entry.config_file}>",
            overrides=[*entry.overrides, *overrides],
        )
    return build_cfg(yaml_file=text, overrides=overrides)


def cfg_to_dict(cfg: CfgNode) -> dict[str, Any]:
    """A plain nested ``dict`` copy of a config (safe for ``torch.load(weights_only=True)``)."""

    def convert(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return convert(cfg)


def cfg_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> CfgNode:
    """Rebuild a frozen config from :func:`cfg_to_dict` output; unknown keys are errors.

    The structure is bounded first (:func:`check_structure`: shared parts counted at every use,
    depth), so a stored config cannot make any later copy or dump grow without bound."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the stored config is a {type(data).__name__}, not a dict")
    check_structure(data, source)
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    solver = data.get("SOLVER")
    if isinstance(solver, dict):
        solver.pop("STEPS", None)  # derived again from STEP_SIZES
    return build_cfg(mapping=data, mapping_source=source)


# Lists of the config: (key, element type, minimum length, maximum length).
_LISTS = (
    ("TRAIN.JITTER_SCALES", int, 2, 2),
    ("SOLVER.STEP_SIZES", int, 1, 1000),
    ("SOLVER.LRS", (int, float), 1, 1000),
)


def _get(cfg: CfgNode, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _check_values(cfg: CfgNode, prefix: str = "") -> None:
    """Every float finite; every list of the right length with elements of the right type."""
    for key, value in cfg.items():
        if isinstance(value, CfgNode):
            _check_values(value, f"{prefix}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key {prefix}{key!s} must be finite, got {value}")
    if prefix:
        return
    for key, kind, low, high in _LISTS:
        value = _get(cfg, key)
        if not isinstance(value, (list, tuple)) or not low <= len(value) <= high:
            n = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
            raise ConfigError(f"config key {key} must be a list of {low} to {high} values, got {n}")
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, kind):
                raise ConfigError(f"config key {key}[{i}] must be a number, got {item!r}")
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"config key {key}[{i}] must be finite, got {item}")
            if isinstance(item, int) and not 0 <= item <= 10**12:
                raise ConfigError(f"config key {key}[{i}] is out of range: {item}")


# Ranges of the keys that size the model or the test views: (key, low, high or None).
_RANGES = (
    ("MODEL.DEPTH", (50, 101)),
    ("MODEL.VIDEO_ARC_CHOICE", (1, 2, 3, 4)),
    ("MODEL.NUM_CLASSES", range(1, 100_001)),
    ("RESNETS.NUM_GROUPS", range(1, 65)),
    ("RESNETS.WIDTH_PER_GROUP", range(1, 1025)),
    ("TRAIN.VIDEO_LENGTH", range(1, 1025)),
    ("TRAIN.CROP_SIZE", range(1, 4097)),
    ("TEST.SCALE", range(1, 4097)),
    ("TEST.NUM_TEST_CLIPS", range(1, 3001)),
    ("NONLOCAL.LAYER_MOD", range(1, 1001)),
)


def estimated_parameters(cfg: CfgNode) -> int:
    """An upper estimate of the parameter count the config implies (ResNet-101, 3-D kernels,
    non-local blocks everywhere), to refuse absurd configs before allocating."""
    width = cfg.RESNETS.NUM_GROUPS * cfg.RESNETS.WIDTH_PER_GROUP
    body = 120_000_000 * (width / 64) ** 2
    return int(body + (2048 + 1) * cfg.MODEL.NUM_CLASSES)


def validate_model_cfg(cfg: CfgNode, source: str = "config") -> None:
    """Check the keys that shape the network (types, ranges, implied size) before any model is
    built; raises :class:`ConfigError` naming ``source`` and the key."""
    for key, allowed in _RANGES:
        value = _get(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
            if key == "MODEL.VIDEO_ARC_CHOICE":
                rule = "must be 1 (C2D R50), 2 (I3D R50), 3 (C2D R101) or 4 (I3D R101);"
            elif isinstance(allowed, range):
                rule = f"must be in {allowed.start}..{allowed.stop - 1},"
            else:
                rule = f"must be one of {sorted(allowed)},"
            raise ConfigError(f"{source}: {key} {rule} got {value!r}")
    params = estimated_parameters(cfg)
    if params > MAX_MODEL_PARAMETERS:
        raise ConfigError(
            f"{source}: the model would have about {params:,} parameters (RESNETS.NUM_GROUPS x "
            f"WIDTH_PER_GROUP, MODEL.NUM_CLASSES); at most {MAX_MODEL_PARAMETERS:,} are accepted"
        )
