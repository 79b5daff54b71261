"""One typed configuration tree, loaded from YAML plus `--set key=value` overrides and
validated before any MPI work starts. The defaults are the CPU preset (`make demo`)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from preprocess.distributions import DISTRIBUTIONS, TEST_FRACTION, SplitError
from preprocess.distributions import validate as split_rule
from preprocess.grid import GRIDS

from .aggregation import RULES as MERGE_RULES
from .algorithms import ALGORITHMS
from .errors import ConfigError, ConfigFileError

SCHEDULES = ("cubic", "fraction")
DEVICES = ("auto", "cpu", "cuda")
VOXELS = tuple(sorted(GRIDS))  # the MNI grids preprocess resamples to
CACHES = ("memory", "device", "off")
AMPS = {"off": None, "bf16": "bfloat16"}  # train.amp -> the torch dtype autocast runs in (None: float32)
INITS = ("torch", "glorot")
MAX_SEED = 2**64  # torch takes seeds as unsigned 64-bit integers
MAX_STARTUP = 2**31 - 1  # seconds: the start-up alarm's limit (68 years: "no limit" in practice)
MAX_THREADS = 4096  # torch threads per rank, beyond any node: torch takes an int32, libgomp sizes its pool by it
# DataLoader worker processes per rank (every rank's loader, the server's evaluation too), each started anew every
# epoch: more than any node has cores to run. 200 took 17 MB each and 5x the wall time of a tiny 3-rank run here;
# data.workers=10000 would start 10000 processes per rank each epoch, about a node's whole pid table (32768).
MAX_WORKERS = 256
MAX_ROUND = 10**12  # seconds: the round header carries twice this in milliseconds as an int64
# The options of the embedded synthetic cohort (DataConfig): read only when data.dir is empty.
SYNTHETIC_KEYS = ("subjects", "voxel", "distribution", "test_fraction", "seed")
# Hardware and I/O choices: they change how fast a run goes, not what it learns. A checkpoint resumes
# across them, and the report compares runs that differ only in them.
RUNTIME_KEYS = (
    "train.device",
    "train.threads",
    "train.channels_last",
    "train.cudnn_benchmark",
    "train.deterministic",
    "data.workers",
    "data.cache",
    "data.cache_dir",
)


def opt(default, help: str):
    """A scalar option with its help text (shown by --help)."""
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    """The data section: where the volumes come from (a split directory, or the synthetic cohort's options) and
    how each rank holds them."""

    dir: str = opt("", "split directory with learner_<k>.h5 and test.h5; empty = the synthetic cohort")
    cache_dir: str = opt("data", "where the synthetic cohort is generated once and cached")
    subjects: int = opt(240, "synthetic cohort size")
    voxel: int = opt(4, "synthetic cohort resolution in mm: 2 (the paper's 91x109x91), 4 or 6")
    distribution: str = opt("uniform-iid", "synthetic cohort split")
    test_fraction: float = opt(TEST_FRACTION, "synthetic cohort: fraction of each age bin held out as test.h5")
    seed: int = opt(0, "synthetic cohort: seed of its subjects and of its split (run.seed leaves the data alone)")
    cache: str = opt(
        "memory",
        "keep each rank's decoded volumes: memory (host RAM) | device (on its GPU: a learner "
        "of the paper's size needs about 3.6 GB) | off (read every epoch)",
    )
    workers: int = opt(
        0,
        "DataLoader worker processes per rank that read volumes from disk each epoch (learners' training, the "
        f"server's evaluation), <= {MAX_WORKERS}; with data.cache=off only",
    )


@dataclass
class ModelConfig:
    """The model section: the CNN's size and initialisation (fedmpi.model.BrainAgeCNN)."""

    width: float = opt(0.25, "channel multiplier; 1.0 is the paper's model")
    pools: int = opt(0, "pooling blocks; 0 = automatic (5 at 2 mm, 4 at 4 mm, 3 at 6 mm)")
    dropout: float = opt(0.0, "dropout before the output layer (the paper's PyTorch variant: 0.5)")
    init: str = opt(
        "torch",
        "torch (PyTorch's defaults) | glorot (Glorot-uniform kernels, zero biases, as the authors' TensorFlow model)",
    )
    norm_eps: float = opt(1e-5, "instance-norm epsilon (PyTorch 1e-5; the authors' TensorFlow model 1e-3)")


@dataclass
class TrainConfig:
    """The train section: each learner's local SGD, and the hardware it runs on."""

    epochs: int = opt(3, "local epochs per round")
    batch_size: int = opt(4, "samples per SGD step")
    lr: float = opt(0.005, "SGD learning rate")
    momentum: float = opt(0.9, "SGD momentum (reset every round)")
    weight_decay: float = opt(0.0, "L2 weight decay")
    prox_mu: float = opt(0.0, "FedProx proximal term; 0 = plain SGD")
    device: str = opt("auto", "auto | cpu | cuda (GPU local_rank % n_gpus)")
    amp: str = opt("off", "mixed precision for training and evaluation: off | bf16 (autocast; weights stay float32)")
    channels_last: bool = opt(
        False, "channels-last-3d memory order for volumes and weights (faster convolutions on recent GPUs)"
    )
    cudnn_benchmark: bool = opt(
        True, "on a GPU, let cuDNN time and pick the fastest convolution algorithms (off under train.deterministic)"
    )
    deterministic: bool = opt(
        False,
        "on a GPU, only cuDNN's deterministic convolution algorithms, without benchmark mode: the same seed gives the "
        "same model, as on a CPU",
    )
    threads: int = opt(
        0,
        "torch threads per rank; 0 = OMP_NUM_THREADS if set, else SLURM_CPUS_PER_TASK, else cores / ranks on the node",
    )


@dataclass
class FederationConfig:
    """The federation section: the algorithm, the learners and rounds, and how the global model is pruned and merged."""

    algorithm: str = opt("fedsparsify-global", " | ".join(ALGORITHMS))
    learners: int = opt(8, "number of learners; the job runs learners + 1 MPI ranks")
    rounds: int = opt(25, "federation rounds")
    target: float = opt(0.95, "final sparsity s_f")
    schedule: str = opt("cubic", "cubic (Zhu & Gupta) | fraction (prune p of the remaining every f rounds)")
    start: int = opt(1, "first pruning round t0")
    end: int = opt(0, "round T at which the cubic schedule reaches the target (0 = last round); later rounds tune")
    frequency: int = opt(1, "prune every f rounds")
    exponent: float = opt(3.0, "exponent of the cubic schedule")
    fraction: float = opt(0.04, "p for the fraction schedule")
    oneshot_round: int = opt(1, "round at which oneshot prunes straight to the target")
    reconfigure_every: int = opt(
        5,
        "prunefl: rounds between reconfigurations of the mask (pruning and regrowth "
        "from the learners' squared gradients)",
    )
    reconfigure_fraction: float = opt(
        0.3,
        "prunefl: fraction of the kept weights, smallest |w| first, that a "
        "reconfiguration may swap for pruned ones of higher importance (the "
        "reference code's 0.3); 1 keeps the top importances alone",
    )
    merge: str = opt("reference", "majority-vote average: reference (zeros count) | kept (only keepers)")
    vote_cap: bool = opt(
        False,
        "FedSparsify-Local: the server also prunes the voted model to s_t (off: the "
        "authors' vote-only merge, whose sparsity is whatever the vote yields)",
    )


@dataclass
class EvalConfig:
    """The eval section: how often the server tests the global model, and in what batches."""

    every: int = opt(1, "evaluate the global model every k rounds (and always at the last round)")
    batch_size: int = opt(4, "evaluation batch size (on CPUs, 8 volumes per batch took twice as long per volume as 4)")


@dataclass
class RunConfig:
    """The run section: where the run's records go, its seed, its checkpoints, how long ranks wait for each other."""

    name: str = opt("demo", "run name: outputs go to run.dir/run.name")
    dir: str = opt("runs", "parent directory of run directories")
    seed: int = opt(0, "seed for the model, data order, dropout and random pruning")
    checkpoint_every: int = opt(1, "checkpoint every k rounds (0 = never)")
    keep_checkpoints: int = opt(2, "checkpoints kept on disk")
    round_timeout: float = opt(
        1800.0,
        "seconds the server waits for learners in one round, and for their start-up (decoding, warm-up) "
        "before round 1 (learners wait that long plus the server's evaluation and checkpoint time for the next round)",
    )
    startup_timeout: float = opt(
        120.0,
        "seconds MPI_Init may take, and any rank waits for the others during start-up (rank table, agreement, "
        "preflight) before naming the silent ones (learners wait 1.25 x this + 5 s, and for the server's model "
        "and test set run.round_timeout more)",
    )
    verbose: bool = opt(False, "learners print their own progress")


@dataclass
class Config:
    """The whole configuration, one dataclass per YAML section; load_config builds and validates it."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def run_dir(self) -> Path:
        """run.dir/run.name: where this run's records go."""
        return Path(self.run.dir) / self.run.name

    @property
    def schedule_end(self) -> int:
        """The round at which the cubic schedule reaches the target: federation.end, or the last round when it is 0."""
        return self.federation.end or self.federation.rounds

    def to_dict(self) -> dict:
        """The configuration as plain nested dicts, as model.npz records it (config_from_dict reads it back)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The text of config.json: the resolved configuration, keys sorted."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# PyYAML reads YAML 1.1, where an unquoted integer with a leading zero is octal (010 is 8) and a number with colons
# is base 60, a time (1:30 is 90, 1:30.5 is 90.5); YAML 1.2, Python and people read neither so.
_OCTAL = re.compile(r"[-+]?0[0-7_]+")
_INT = "tag:yaml.org,2002:int"


class _Unquoted(str):
    """An unquoted YAML scalar that YAML reads as a number or a bool: its text as written, YAML's reading (`value`)
    and its tag. A text option takes the text (name: 010 stays "010", not 8; yes stays "yes"), a typed one the
    reading (yaml_value), and TextKeepingDumper writes the text back."""

    value: object
    tag: str

    def __repr__(self) -> str:
        """As written, unquoted: a message's "got 0" shows what the file says."""
        return str(self)

    def misread(self) -> str | None:
        """What YAML 1.1 took this number for where a reader of decimals would not: octal, base 60, or None."""
        if ":" in self:  # an int's or a float's: a bool has none
            return "a base-60 number"
        return "an octal number" if self.tag == _INT and _OCTAL.fullmatch(self) else None


def yaml_value(value, key: str):
    """What a typed (not text) option or study field takes of a value TextKeepingLoader read: YAML's reading of an
    unquoted number or bool, but ConfigError where that reading is YAML 1.1's octal or base 60 (every: 010 was 8,
    round_timeout: 1:30 was 90 seconds, silently); any other value as it is."""
    if not isinstance(value, _Unquoted):
        return value
    misread = value.misread()
    if misread:
        raise ConfigError(
            f"{key}: YAML 1.1 reads the unquoted {value} as {value.value!r}, {misread}; write the number in decimal"
        )
    return value.value


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (config files here, study files in jobs/)."""

    def flatten_mapping(self, node):
        """A key given twice in one mapping is refused (YAML forbids it; PyYAML kept the last silently, so a second
        `train:` section dropped the first's options). A merge key's (`<<: *base`) keys may still be given again.
        Checked here, before the merge is written into the node (SafeLoader's flatten_mapping replaces its `<<` by
        the merged keys), once per node: a mapping merged before it is constructed (an anchor in a `<<`) is not
        checked again with the merged keys in it."""
        checked = self.__dict__.setdefault("_unique_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping",
                            node.start_mark,
                            f"found duplicate key {key!r}",
                            key_node.start_mark,
                        )
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeLoader's own error names it
                    pass
        super().flatten_mapping(node)


class TextKeepingLoader(UniqueKeyLoader):
    """UniqueKeyLoader that reads an unquoted number or bool as an _Unquoted, a str of its text as written with
    YAML's reading beside it (config files, and study files in jobs/)."""


class TextKeepingDumper(yaml.SafeDumper):
    """yaml.SafeDumper that writes an unquoted scalar TextKeepingLoader read as it was written, so that a copy of a
    config file reads as the file does (yaml.safe_dump of safe_load's reading wrote dir: 010 as 8, name: yes as true,
    and a text option took those)."""


def _keeping_text(construct):
    def constructor(loader, node):
        scalar = _Unquoted(node.value)
        scalar.value = construct(loader, node)
        scalar.tag = node.tag
        return scalar

    return constructor


for _tag, _construct in (
    ("int", yaml.SafeLoader.construct_yaml_int),
    ("float", yaml.SafeLoader.construct_yaml_float),
    ("bool", yaml.SafeLoader.construct_yaml_bool),
):
    TextKeepingLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _keeping_text(_construct))
TextKeepingDumper.add_representer(_Unquoted, lambda dumper, scalar: dumper.represent_scalar(scalar.tag, str(scalar)))


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line, by the file's line and column: PyYAML's own text names the source "<unicode string>"
    and quotes the offending lines over several lines of its own."""
    if isinstance(e, yaml.reader.ReaderError) and isinstance(e.character, int):  # a control character: an offset
        return f"character {e.position + 1}: unacceptable character #x{e.character:04x} ({e.reason})"
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return " ".join(str(e).split())
    text = f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}"  # type: ignore[attr-defined]
    context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and start is not None and start.line != mark.line:
        text += f" ({context} from line {start.line + 1})"
    return text


def integer(value) -> int:
    """An integer option's value, or ValueError: an int or an integer's text exactly (however large: a float would
    round it), a whole-valued float or its text (1e3, 1000.0) as that integer; never a bool. preprocess's
    command line takes its counts by the same rule."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):  # the text of --set or a quoted YAML value
        try:
            return int(value)
        except ValueError:
            pass
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(value) from None
    if not math.isfinite(f) or f != int(f):
        raise ValueError(value)
    return int(f)


def _coerce(value, tp, key: str):
    """Convert a YAML or command-line value to the field's declared type."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        try:
            return integer(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(f):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    raise TypeError(tp)


# Values earlier versions wrote for options that have changed type, read as today's equivalent, so run
# records (config.json, checkpoints, models) made by an earlier fedmpi stay readable.
RENAMED_VALUES: dict[str, dict] = {
    "data.cache": {True: "memory", False: "off", "true": "memory", "false": "off"},  # a bool before 0.2
}


def unknown(
    name: str, key: str, known: list[str], prefix: str = "", kind: str = "option", elsewhere: list[str] | None = None
) -> str:
    """The message for an unknown option (or a study file's key, jobs/sweep.py): the full names of the same key in
    other places (`elsewhere`: an option put in the wrong section), else the known one it is close to (a
    misspelling), else every known one."""
    close = elsewhere or [prefix + c for c in difflib.get_close_matches(key, known, n=1)]
    if close:
        return f"unknown {kind} {name!r}; did you mean {' or '.join(repr(c) for c in close)}?"
    return f"unknown {kind} {name!r}; known: {', '.join(prefix + k for k in known)}"


def _homes(key: str, name: str) -> list[str]:
    """The options named `key` in the sections other than `name`'s: section.key for each (rounds is
    federation.rounds; seed both data.seed and run.seed)."""
    sections = typing.get_type_hints(Config)
    homes = [f"{s}.{key}" for s, tp in sections.items() if key in typing.get_type_hints(tp)]
    return [home for home in homes if home != name]


def _apply(section, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(unknown(name, str(key), list(hints), prefix, elsewhere=_homes(str(key), name)))
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            value = {} if value is None else value  # `train:` with every option under it commented out
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a mapping of options")
            _apply(current, value, f"{name}.")
        else:
            if isinstance(value, _Unquoted):
                value = str(value) if hints[key] is str else yaml_value(value, name)
            value = RENAMED_VALUES.get(name, {}).get(value, value) if isinstance(value, (bool, str)) else value
            setattr(section, key, _coerce(value, hints[key], name))


def parse_overrides(pairs: list[str]) -> dict:
    """Turn ['federation.target=0.9', ...] into a nested dict of raw strings; each option's type converts
    its own string (so run.name=010 stays "010")."""
    tree: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set key must look like section.option, got {key!r}")
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            raw = raw[1:-1]  # one level of quotes, as YAML would take them
        tree.setdefault(parts[0], {})[parts[1]] = raw
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build and validate the configuration: defaults < YAML file < --set overrides."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigFileError(f"config file not found: {p}")
        try:
            values = yaml.load(p.read_text(encoding="utf-8"), Loader=TextKeepingLoader) or {}  # a SafeLoader
        except UnicodeDecodeError as e:
            raise ConfigFileError(
                f"config file {p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                f"{e.start}); save it as UTF-8"
            ) from None
        except yaml.YAMLError as e:
            raise ConfigFileError(f"config file {p} is not valid YAML: {yaml_problem(e)}") from None
        except OSError as e:  # no read permission, an I/O error: each node's own answer, like a missing file
            raise ConfigFileError(f"config file {p} cannot be read: {e.strerror}") from None
        if not isinstance(values, dict):
            raise ConfigFileError(f"config file {p} must hold a mapping of sections")
        _apply(cfg, values, "")
    _apply(cfg, parse_overrides(overrides or []), "")
    validate(cfg)
    return cfg


def config_from_dict(values: dict) -> Config:
    """A validated Config from a recorded one (model.npz, a checkpoint's resume key): options it lacks, added since
    it was written, take their defaults."""
    cfg = Config()
    _apply(cfg, values, "")
    validate(cfg)
    return cfg


def setting_changes(before: dict, now: dict, prefix: str = "", shown=repr) -> list[str]:
    """'section.option: old -> new' for every setting that differs between two configurations as nested dicts
    (resume keys; rank 0's configuration and another rank's); `shown` writes a value."""
    out = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += setting_changes(a, b, f"{prefix}{key}.", shown)
        elif a != b:
            out.append(f"{prefix}{key}: {shown(a)} -> {shown(b)}")
    return out


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# preprocess.split's command-line flags, as the options that set them for the embedded synthetic cohort
SPLIT_FLAGS = {"--learners": "federation.learners", "--test-fraction": "data.test_fraction", "--seed": "data.seed"}


def split_error_text(text: str) -> str:
    """A split's error about the synthetic cohort, naming this configuration's options instead of the flags."""
    for flag, option in SPLIT_FLAGS.items():
        text = text.replace(flag, option)
    return f"the synthetic cohort (data.dir empty): {text}"


def _check_synthetic_split(learners: int, distribution: str) -> None:
    """The split's own rule for the learner count (uniform-noniid pairs learners), before MPI starts rather
    than when rank 0 builds the cohort."""
    try:
        split_rule(learners, distribution)
    except SplitError as e:
        raise ConfigError(split_error_text(str(e))) from None


def validate(cfg: Config) -> None:
    """ConfigError naming the first option that is out of its range or inconsistent with another."""
    d, m, t, f, e, r = cfg.data, cfg.model, cfg.train, cfg.federation, cfg.eval, cfg.run
    _check(d.voxel in VOXELS, f"data.voxel must be one of {VOXELS}, got {d.voxel}")
    _check(0 < d.test_fraction < 1, f"data.test_fraction must be in (0, 1), got {d.test_fraction}")
    _check(
        d.distribution in DISTRIBUTIONS,
        f"data.distribution must be one of {tuple(DISTRIBUTIONS)}, got {d.distribution!r}",
    )
    _check(d.subjects >= 20, f"data.subjects must be at least 20, got {d.subjects}")
    if not d.dir and f.learners >= 1 and d.distribution in DISTRIBUTIONS:
        _check_synthetic_split(f.learners, d.distribution)
    _check(0 <= d.workers <= MAX_WORKERS, f"data.workers must be in [0, {MAX_WORKERS}], got {d.workers}")
    _check(d.cache in CACHES, f"data.cache must be one of {CACHES}, got {d.cache!r}")
    _check(
        d.workers == 0 or d.cache == "off",
        f"data.workers={d.workers} needs data.cache=off: workers read volumes from disk; a rank that caches them "
        f"(data.cache={d.cache}) serves them itself, about 10x faster than through workers, which pass every batch "
        "back through shared memory",
    )
    _check(t.amp in AMPS, f"train.amp must be one of {tuple(AMPS)}, got {t.amp!r}")
    _check(m.width > 0, f"model.width must be > 0, got {m.width}")
    _check(0 <= m.pools <= 5, f"model.pools must be 0 (auto) to 5, got {m.pools}")
    _check(0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}")
    _check(m.init in INITS, f"model.init must be one of {INITS}, got {m.init!r}")
    _check(m.norm_eps > 0, f"model.norm_eps must be > 0, got {m.norm_eps}")
    _check(t.epochs >= 1, "train.epochs must be >= 1")
    _check(t.batch_size >= 1, "train.batch_size must be >= 1")
    _check(t.lr > 0, "train.lr must be > 0")
    _check(0 <= t.momentum < 1, "train.momentum must be in [0, 1)")
    _check(t.weight_decay >= 0 and t.prox_mu >= 0, "train.weight_decay and train.prox_mu must be >= 0")
    _check(t.device in DEVICES, f"train.device must be one of {DEVICES}, got {t.device!r}")
    _check(0 <= t.threads <= MAX_THREADS, f"train.threads must be in [0, {MAX_THREADS}], got {t.threads}")
    _check(f.algorithm in ALGORITHMS, f"federation.algorithm must be one of {tuple(ALGORITHMS)}, got {f.algorithm!r}")
    _check(f.learners >= 1, "federation.learners must be >= 1")
    _check(f.rounds >= 1, "federation.rounds must be >= 1")
    _check(0 <= f.target < 1, f"federation.target must be in [0, 1), got {f.target}")
    _check(f.schedule in SCHEDULES, f"federation.schedule must be one of {SCHEDULES}, got {f.schedule!r}")
    _check(f.start >= 1, "federation.start must be >= 1")
    unused = ALGORITHMS[f.algorithm].unused_options(f.schedule) if f.algorithm in ALGORITHMS else frozenset()
    _check(
        "end" in unused or f.end == 0 or f.start < f.end <= f.rounds,
        f"federation.end must be 0 (the last round) or between federation.start and federation.rounds, got {f.end}",
    )
    _check(
        f.algorithm not in ALGORITHMS
        or not ALGORITHMS[f.algorithm].progressive
        or ("end" in unused and f.rounds > f.start)
        or ("end" not in unused and cfg.schedule_end > f.start),
        "federation.rounds must exceed federation.start for a progressive schedule",
    )
    _check(f.frequency >= 1, "federation.frequency must be >= 1")
    _check(f.exponent > 0, "federation.exponent must be > 0")
    _check(0 < f.fraction < 1, "federation.fraction must be in (0, 1)")
    _check(
        "oneshot_round" in unused or 1 <= f.oneshot_round <= f.rounds,
        "federation.oneshot_round must be within the rounds",
    )
    _check(f.reconfigure_every >= 1, f"federation.reconfigure_every must be >= 1, got {f.reconfigure_every}")
    _check(
        0 < f.reconfigure_fraction <= 1,
        f"federation.reconfigure_fraction must be in (0, 1], got {f.reconfigure_fraction}",
    )
    _check(f.merge in MERGE_RULES, f"federation.merge must be one of {MERGE_RULES}, got {f.merge!r}")
    _check(e.every >= 1 and e.batch_size >= 1, "eval.every and eval.batch_size must be >= 1")
    _check(
        bool(r.name) and r.name.isprintable() and "/" not in r.name and r.name not in (".", ".."),
        f"run.name must be a plain name (printable, without '/'), got {r.name!r}",
    )
    _check(0 <= r.seed < MAX_SEED, f"run.seed must be in [0, 2**64), got {r.seed}")
    _check(0 <= d.seed < MAX_SEED, f"data.seed must be in [0, 2**64), got {d.seed}")
    _check(r.checkpoint_every >= 0, "run.checkpoint_every must be >= 0 (0 = never)")
    _check(r.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1")
    for name, seconds, most in (
        ("round_timeout", r.round_timeout, MAX_ROUND),
        ("startup_timeout", r.startup_timeout, MAX_STARTUP),
    ):
        _check(0 < seconds <= most, f"run.{name} must be in (0, {most:g}] seconds, got {seconds}")


def describe() -> str:
    """Every option with its default, for --help."""
    lines = []
    for section in dataclasses.fields(Config):
        inst = getattr(Config(), section.name)
        for f in dataclasses.fields(inst):
            text = f.metadata.get("help", "")
            lines.append(f"  {section.name}.{f.name} = {getattr(inst, f.name)!r}" + (f"  ({text})" if text else ""))
    return "\n".join(lines)
