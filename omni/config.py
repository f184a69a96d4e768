"""Typed configuration from JSON, with `--set key=value` overrides.

Each stage declares a dataclass that extends `TrainConfig` with its own keys. A config file is a
flat JSON object; keys starting with "_" are comments. Every value is type-checked against the
dataclass annotations and range-checked against its field's bounds (every float must be finite), so a
typo, a wrong type or an impossible value stops the program with one line naming the key. Cross-field
rules (heads that divide the width, ...) are each class's `__post_init__`.

The model's architecture is a dataclass of its own (ThinkerArch, ... : subclasses of `Arch`) that a
stage config inherits next to TrainConfig; `Arch.from_config` builds one from a stage config or from
the dict a checkpoint saved, with the same checks, and refuses a model too large for this machine
before any memory is allocated (`check_size`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field


class UserError(Exception):
    """A problem the user can fix (bad key, missing file, ...): printed as one line, exit status 2."""


class ArchError(UserError, ValueError):
    """An architecture that cannot be built (heads that do not divide the width, ...): one line for the
    command lines like any UserError, and a ValueError for code that builds a network directly."""


def choice(default: str, *options: str):
    """A string field limited to `options` (default first)."""
    return field(default=default, metadata={"choices": (default,) + options})


def positive(default):
    return field(default=default, metadata={"min": 1})


def non_negative(default):
    return field(default=default, metadata={"min": 0})


def fraction(default: float = 0.0):
    """A float field in [0, 1] (a share or a probability)."""
    return field(default=default, metadata={"min": 0.0, "max": 1.0})


def probability(default: float = 0.0):
    """A float field in [0, 1): a dropout rate or a decay, where 1 would drop or keep everything."""
    return field(default=default, metadata={"min": 0.0, "below": 1.0})


def above(default: float, low: float = 0.0):
    """A float field greater than `low` (a learning rate, a scale)."""
    return field(default=default, metadata={"above": low})


def inherited():
    """An int key a stage takes from a checkpoint it loads: 0 (the default) inherits the value, any
    other value must equal it (`inherit`)."""
    return field(default=0, metadata={"min": 0, "inherited": True})


def inherit(cfg, key: str, value: int, source: str) -> None:
    """Set cfg.key to `value`, read from the checkpoint in folder `source`; an explicit value that
    differs is a UserError naming the key and the folder."""
    mine = getattr(cfg, key)
    if mine and mine != value:
        raise UserError(f"config key '{key}': {mine} differs from {value} of the model in {source}; "
                        f"leave it out (or 0) to inherit it")
    setattr(cfg, key, value)


def inherits(cls, key: str, value) -> bool:
    """Whether `value` of config key `key` of `cls` means "inherit" (the stage fills it in)."""
    f = {f.name: f for f in dataclasses.fields(cls)}.get(key)
    return f is not None and f.metadata.get("inherited", False) and value == f.default


class Checked:
    """Root of the config dataclasses. Each class's `__post_init__` checks its cross-field rules and first
    calls super().__post_init__(), so a stage config runs the checks of TrainConfig and of every Arch it
    inherits."""

    def __post_init__(self):
        pass


@dataclass
class TrainConfig(Checked):
    """Keys every stage shares. Stages subclass this and add their model and data keys."""
    seed: int = 0
    size: str = ""      # a named size of the stage's model (its Arch's SIZES: "tiny", "base"); "" = the defaults
    device: str = choice("auto", "cpu", "cuda", "mps")   # auto: CUDA, else Apple's MPS, else the CPU
    amp: str = choice("off", "bf16", "fp16")
    batch_size: int = positive(16)
    grad_accum_steps: int = positive(1)
    lr: float = non_negative(1e-3)    # 0 freezes the weights (a run that only validates, a test)
    min_lr_ratio: float = fraction(0.1)   # cosine decays to lr * min_lr_ratio at max_steps
    weight_decay: float = non_negative(0.01)
    adam_beta1: float = 0.9            # AdamW's moment decay rates
    adam_beta2: float = 0.95
    adamw_impl: str = choice("auto", "foreach", "fused", "loop")   # auto: torch's pick (foreach on CUDA)
    compile: bool = False              # torch.compile every module's forward (speed only; same checkpoints)
    warmup_steps: int = non_negative(100)
    max_steps: int = positive(1000)
    grad_clip: float = non_negative(1.0)   # 0 turns clipping off
    max_nonfinite_steps: int = non_negative(20)  # a step whose loss or gradients are inf/NaN is skipped;
                                                 # this many in a row stop the run (exit 2); 0 = never stop
    eval_interval: int = positive(100)
    eval_batches: int = non_negative(0)   # 0 = the whole validation set
    early_stop_steps: int = non_negative(0)  # stop at a validation when val_loss has not improved for
                                             # this many steps; 0 = train to max_steps
    checkpoint_freq: int = non_negative(100)  # a {prefix}_step_N.pt every N steps; 0 = only best and final
    keep_last_n: int = non_negative(3)      # newest step files kept; 0 = keep every one
    archive_every: int = non_negative(0)    # step files at multiples of N outlive keep_last_n, slimmed
                                            # to weights as {prefix}_archive_N.pt; 0 = off
    log_interval: int = positive(10)
    log_to: list[str] = field(default_factory=lambda: ["jsonl"],
                              metadata={"choices": ("jsonl", "tensorboard")})
                                            # metrics.jsonl always; "tensorboard" mirrors it in save_dir/tb
    save_dir: str = "checkpoints/run"
    num_workers: int = non_negative(0)
    cpu_threads: int = non_negative(0)  # torch's threads on the CPU; 0 = its default (OMP_NUM_THREADS, else all cores)
    strict_data: bool = False          # a bad sample is an error instead of being skipped
    demo_dir: str = ""                 # data files missing under this folder -> build the demo world
    demo_size: str = choice("small", "tiny", "medium")
    progress: bool = True              # tqdm bar on a terminal, else a plain line every 10 % / 30 s
    parallel: str = choice("ddp", "fsdp")   # under torchrun: DistributedDataParallel, or FSDP2 sharding
                                            # (stages A and E) with sharded step folders

    def __post_init__(self):
        super().__post_init__()
        for key in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise UserError(f"config key '{key}': must be in [0, 1), got {getattr(self, key)!r}")
        if self.archive_every and (not self.checkpoint_freq or self.archive_every % self.checkpoint_freq):
            raise UserError(f"config key 'archive_every': must be a multiple of checkpoint_freq "
                            f"({self.checkpoint_freq}) so that archived steps have step files, "
                            f"got {self.archive_every}")


_SCALARS = (bool, int, float, str)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(key: str, value, tp, f: dataclasses.Field):
    """Return `value` converted to `tp`, or raise UserError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"config key '{key}': expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item_tp, f) for i, v in enumerate(value)]
    ok = (isinstance(value, tp) and not (tp is int and isinstance(value, bool))) or (
        tp is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise UserError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    value = float(value) if tp is float else value
    if tp is float and not math.isfinite(value):    # JSON and --set both read NaN and Infinity
        raise UserError(f"config key '{key}': must be a finite number, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"config key '{key}': must be one of {', '.join(choices)}, got {value!r}")
    _check_bounds(key, value, f.metadata)
    return value


_BOUNDS = (("min", "at least", lambda v, b: v >= b), ("above", "greater than", lambda v, b: v > b),
           ("max", "at most", lambda v, b: v <= b), ("below", "less than", lambda v, b: v < b))


def _check_bounds(key: str, value, metadata) -> None:
    for name, words, holds in _BOUNDS:
        bound = metadata.get(name)
        if bound is not None and not holds(value, bound):
            raise UserError(f"config key '{key}': must be {words} {bound}, got {value!r}")


def check_type(key: str, value, tp):
    """`value` converted to type `tp` (an int is a float), or UserError naming `key`: for a config value
    read outside a dataclass."""
    return _check_value(key, value, tp, dataclasses.field())


def _fields(cls) -> dict[str, tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def parse_override(text: str, cls) -> tuple[str, object]:
    """Parse one `key=value` from --set. The value is JSON, or plain text for string keys."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {text!r}: expected key=value")
    known = _fields(cls)
    if key not in known:
        raise UserError(f"--set: unknown config key '{key}' for {cls.__name__}")
    tp = known[key][1]
    if tp is str and not raw.startswith('"'):
        return key, raw
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        raise UserError(f"--set {key}: cannot read {raw!r} as {_type_name(tp)}") from None


def build_config(cls, values: dict, source: str = "config", ignore_unknown: bool = False):
    """Type- and range-check a dict of values into an instance of the dataclass `cls`. An unknown key is
    a UserError naming `source`, or, with ignore_unknown (a config a checkpoint saved: it may come from
    a newer version), left out."""
    known = _fields(cls)
    kwargs = {}
    for key, value in values.items():
        if key.startswith("_") or (ignore_unknown and key not in known):
            continue
        if key not in known:
            raise UserError(f"{source}: unknown config key '{key}' for {cls.__name__}")
        f, tp = known[key]
        kwargs[key] = _check_value(key, value, tp, f)
    return cls(**kwargs)


def read_json(path: str, what: str = "config") -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: invalid JSON: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object of config keys")
    return data


def load_config(cls, path: str | None, overrides: typing.Sequence[str] = ()):
    """Config of type `cls` from a JSON file (or the defaults), then `--set` overrides on top; the keys of
    the named `size` they give, if any, fill in the architecture keys neither sets."""
    values = read_json(path) if path else {}
    for text in overrides:
        key, value = parse_override(text, cls)
        values[key] = value
    if values.get("size"):
        values = {**size_values(cls, values["size"]), **values}
    return build_config(cls, values, source=path or "config")


def size_values(cls, size) -> dict:
    """The architecture keys of the named size `size` of every Arch base of the config class `cls`."""
    archs = [base for base in cls.__mro__ if "SIZES" in vars(base) and base is not Arch]
    names = sorted({name for base in archs for name in base.SIZES})
    if not isinstance(size, str) or not any(size in base.SIZES for base in archs):
        known = f"one of {', '.join(names)}" if names else f"none: {cls.__name__} has no named sizes"
        raise UserError(f"config key 'size': unknown size {size!r} ({known})")
    return {key: value for base in reversed(archs) for key, value in base.SIZES.get(size, {}).items()}


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def arch_from_config(cls, cfg, source: str | None = None):
    """An architecture dataclass filled from a stage config (the config object, or the dict saved
    in a checkpoint or config.json); keys it does not hold keep their defaults. The values are type-
    and range-checked like a config file's and the model's size is checked (`check_size`); errors name
    `source` (the file the dict came from) when given. `Arch.from_config`."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d: getattr(cfg, k, d)
    defaults = cls()
    try:
        arch = build_config(cls, {f.name: get(f.name, getattr(defaults, f.name)) for f in dataclasses.fields(cls)})
        check_size(arch)
    except UserError as e:
        raise (type(e)(f"{source}: {e}") if source else e) from None
    return arch


@dataclass
class Arch(Checked):
    """Base of the architecture dataclasses (ThinkerArch, VisionArch, ...). A stage config inherits the
    ones of its model, so their fields are its architecture keys: the layout and meaning of the weights,
    refused when they change on resume (omni/resume_policy.py). SIZES names sets of their values that a
    config picks with its `size` key (`load_config`)."""
    SIZES: typing.ClassVar[dict[str, dict]] = {}
    from_config = classmethod(arch_from_config)

    def network(self):
        """The module whose parameters these keys size (`check_size` builds it on the meta device)."""
        raise NotImplementedError


def check_heads(arch, width: str, heads: str, kv_heads: str | None = None, rotary: bool = False) -> None:
    """ArchError unless attention heads split the width evenly: `heads` divides `width`, `kv_heads` (grouped
    query attention) divides `heads`, and with rotary positions each head's size is even."""
    dim, n = getattr(arch, width), getattr(arch, heads)
    if dim % n:
        raise ArchError(f"config key '{heads}': must divide {width} ({dim}), got {n}")
    if kv_heads and n % getattr(arch, kv_heads):
        raise ArchError(f"config key '{kv_heads}': must divide {heads} ({n}), got {getattr(arch, kv_heads)}")
    if rotary and (dim // n) % 2:
        raise ArchError(f"config key '{heads}': {width} / {heads} = {dim // n} must be even (rotary positions "
                        f"rotate pairs of dimensions), got {n}")


def memory_bytes() -> int:
    """What this process may allocate at most: the machine's memory, or its cgroup limit when lower."""
    limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            text = f.read().strip()
        return min(limit, int(text)) if text.isdigit() else limit
    except OSError:
        return limit


def check_size(arch: Arch) -> None:
    """UserError naming the size keys when the network of `arch` would not fit in memory even once in float32.
    It is built on the meta device first (shapes, no storage), so an absurd size read from a config
    (vocab_size 2**40) ends in this line, not in an allocation that fails or an out-of-memory kill."""
    import torch  # here, not at the top: reading a config does not need torch
    with torch.device("meta"):
        module = arch.network()
    n = sum(t.numel() for t in (*module.parameters(), *module.buffers()))
    limit = memory_bytes()
    if 4 * n > limit:
        sizes = ", ".join(f"{f.name}={getattr(arch, f.name)}" for f in dataclasses.fields(arch)
                          if type(getattr(arch, f.name)) is int)
        raise UserError(f"model too large: {type(arch).__name__} with {n:,} parameters needs {4 * n / 2**30:,.1f} "
                        f"GiB as float32, more than this machine's {limit / 2**30:,.1f} GiB ({sizes})")
