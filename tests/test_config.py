"""Configuration: defaults < YAML < --set, type coercion, validation messages, every shipped YAML loads."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from fedmpi.config import (
    Config,
    ConfigError,
    UniqueKeyLoader,
    config_from_dict,
    describe,
    load_config,
    parse_overrides,
    setting_changes,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def options():
    """Every (section, option) pair of the configuration tree."""
    cfg = Config()
    return [(s.name, f.name) for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]


def test_defaults_validate_and_match_cpu_preset():
    cfg = Config()
    validate(cfg)
    assert load_config().to_dict() == cfg.to_dict()
    assert load_config(CONFIGS / "cpu.yaml").to_dict() == cfg.to_dict()


def test_yaml_overrides_defaults_and_set_overrides_yaml(tmp_path):
    path = write(tmp_path, "federation:\n  rounds: 10\n  target: 0.8\ntrain:\n  epochs: 2\n")
    cfg = load_config(path, ["federation.target=0.9", "train.lr=0.01"])
    assert cfg.federation.rounds == 10  # from YAML
    assert cfg.federation.target == 0.9  # --set beats YAML
    assert cfg.train.lr == 0.01  # --set beats default
    assert cfg.train.epochs == 2
    assert cfg.train.batch_size == Config().train.batch_size  # untouched default


@pytest.mark.parametrize("raw, expected", [("3", 3), ("3.0", 3), ("'3'", 3), ("1e1", 10)])
def test_int_coercion(raw, expected):
    cfg = load_config(overrides=[f"train.epochs={raw}"])
    assert cfg.train.epochs == expected and type(cfg.train.epochs) is int


@pytest.mark.parametrize("raw", ["3.5", "three", "true", "[1, 2]", ""])
def test_int_coercion_rejects(raw):
    with pytest.raises(ConfigError, match=r"train.epochs: expected an integer"):
        load_config(overrides=[f"train.epochs={raw}"])


@pytest.mark.parametrize("raw", ["inf", "nan", ".inf"])
def test_int_coercion_rejects_non_finite(raw):
    with pytest.raises(ConfigError, match=r"train.epochs"):
        load_config(overrides=[f"train.epochs={raw}"])


def test_large_integers_from_a_file_are_kept_exactly_or_refused_cleanly(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  seed: 12345678901234567891\n")
    assert load_config(str(path)).run.seed == 12345678901234567891  # through a float it would change
    path.write_text("train:\n  lr: " + "9" * 400 + "\n")
    with pytest.raises(ConfigError, match=r"train.lr: expected a number"):
        load_config(str(path))


def test_float_coercion():
    cfg = load_config(overrides=["train.lr=1", "federation.target='0.5'"])
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.federation.target == 0.5
    with pytest.raises(ConfigError, match=r"train.lr: expected a number"):
        load_config(overrides=["train.lr=fast"])


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("yes", True),
        ("no", False),
        ("true", True),
        ("false", False),
        ("True", True),
        ("off", False),
        ("'1'", True),
        ("'0'", False),
    ],
)
def test_bool_coercion(raw, expected):
    assert load_config(overrides=[f"train.channels_last={raw}"]).train.channels_last is expected


@pytest.mark.parametrize("raw, expected", [("1", True), ("0", False)])
def test_bool_coercion_numeric_on_command_line(raw, expected):
    assert load_config(overrides=[f"train.channels_last={raw}"]).train.channels_last is expected


def test_bool_coercion_in_yaml(tmp_path):
    assert load_config(write(tmp_path, "train:\n  channels_last: 'no'\n")).train.channels_last is False
    assert load_config(write(tmp_path, "train:\n  channels_last: false\n")).train.channels_last is False


@pytest.mark.parametrize("raw", ["maybe", "2", "[true]"])
def test_bool_coercion_rejects(raw):
    with pytest.raises(ConfigError, match=r"train.channels_last: expected true or false"):
        load_config(overrides=[f"train.channels_last={raw}"])


def test_string_option_rejects_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"run.name: expected a string"):
        load_config(write(tmp_path, "run:\n  name: {a: 1}\n"))


def test_null_string_is_empty(tmp_path):
    assert load_config(write(tmp_path, "data:\n  dir: null\n")).data.dir == ""


def test_string_option_keeps_its_text():
    assert load_config(overrides=["run.name=010"]).run.name == "010"


# YAML 1.1 reads 8, True, 1.5, 16, 2024, 90, 90.5, -8
@pytest.mark.parametrize("raw", ["010", "yes", "1.50", "0x10", "2024", "1:30", "1:30.5", "-010"])
def test_a_text_option_keeps_an_unquoted_word_as_written(tmp_path, raw):
    """run: {name: 010} became run.name "8" and name: yes "True", silently; a typed option still takes YAML's
    reading where it is no octal or base-60 number (eval.every: 0x10 is 16, as before)."""
    assert load_config(write(tmp_path, f"run:\n  name: {raw}\n")).run.name == raw
    assert load_config(write(tmp_path, f"run:\n  name: '{raw}'\n")).run.name == raw
    cfg = load_config(write(tmp_path, "eval:\n  every: 0x10\ntrain:\n  lr: 1.0e-3\n  channels_last: yes\n"))
    assert (cfg.eval.every, cfg.train.lr, cfg.train.channels_last) == (16, 0.001, True)


@pytest.mark.parametrize(
    "text, message",
    [
        ("eval:\n  every: 010\n", "eval.every: YAML 1.1 reads the unquoted 010 as 8, an octal number"),
        ("run:\n  seed: -010\n", "run.seed: YAML 1.1 reads the unquoted -010 as -8, an octal number"),
        ("run:\n  round_timeout: 1:30\n", "run.round_timeout: YAML 1.1 reads the unquoted 1:30 as 90, a base-60"),
        ("train:\n  lr: 1:30.5\n", "train.lr: YAML 1.1 reads the unquoted 1:30.5 as 90.5, a base-60 number"),
        ("train:\n  channels_last: 00\n", "train.channels_last: YAML 1.1 reads the unquoted 00 as 0, an octal"),
    ],
)
def test_a_typed_option_refuses_yaml_octal_and_base60_numbers(tmp_path, text, message):
    """eval.every: 010 was 8 and run.round_timeout: 1:30 was 90 seconds, silently (YAML 1.1; YAML 1.2 and Python
    read neither so): refused in one line, which a quoted value or --set (both read as decimal) is not."""
    with pytest.raises(ConfigError, match="^" + re.escape(message)) as e:
        load_config(write(tmp_path, text))
    assert "\n" not in str(e.value) and str(e.value).endswith("; write the number in decimal")
    assert load_config(write(tmp_path, "eval:\n  every: '010'\n")).eval.every == 10
    assert load_config(overrides=["eval.every=010"]).eval.every == 10


def test_every_shipped_config_reads_as_pyyaml_reads_it():
    """Keeping unquoted words as written, and refusing octal and base-60 numbers, changes no shipped config."""
    for path in SHIPPED:
        assert load_config(path).to_dict() == config_from_dict(yaml.safe_load(path.read_text())).to_dict(), path


def test_unknown_option_lists_known_names():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["train.learning_rate=0.1"])
    msg = str(e.value)
    assert "'train.learning_rate'" in msg
    for name in ("train.lr", "train.epochs", "train.momentum", "train.device"):
        assert name in msg


def test_unknown_section_lists_known_sections(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "optimizer:\n  lr: 0.1\n"))
    msg = str(e.value)
    assert "'optimizer'" in msg and "did you mean" not in msg
    for name in ("data", "model", "train", "federation", "eval", "run"):
        assert name in msg


@pytest.mark.parametrize(
    "text, sets, message",
    [
        ("", ["train.epoch=2"], "unknown option 'train.epoch'; did you mean 'train.epochs'?"),
        (
            "",
            ["federation.algoritm=fedavg"],
            "unknown option 'federation.algoritm'; did you mean 'federation.algorithm'?",
        ),
        ("", ["runs.name=x"], "unknown option 'runs'; did you mean 'run'?"),
        ("training:\n  lr: 0.1\n", [], "unknown option 'training'; did you mean 'train'?"),
        ("train:\n  batchsize: 2\n", [], "unknown option 'train.batchsize'; did you mean 'train.batch_size'?"),
    ],
)
def test_an_unknown_option_close_to_a_known_one_is_named(tmp_path, text, sets, message):
    """A misspelt key (in --set or the file) listed every option of its section for the user to search."""
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        load_config(write(tmp_path, text) if text else None, sets)


@pytest.mark.parametrize(
    "text, sets, message",
    [
        ("rounds: 20\n", [], "unknown option 'rounds'; did you mean 'federation.rounds'?"),
        (
            "",
            ["federation.round_timeout=30"],
            "unknown option 'federation.round_timeout'; did you mean 'run.round_timeout'?",
        ),
        ("train:\n  seed: 1\n", [], "unknown option 'train.seed'; did you mean 'data.seed' or 'run.seed'?"),
        ("eval:\n  epochs: 2\n", [], "unknown option 'eval.epochs'; did you mean 'train.epochs'?"),
    ],
)
def test_an_option_written_in_another_section_is_pointed_to_its_own(tmp_path, text, sets, message):
    """An option of another section was answered by spelling alone: rounds: at the top level with 'did you mean
    'run'?' (a section without it), federation.round_timeout with every federation option, not run.round_timeout."""
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        load_config(write(tmp_path, text) if text else None, sets)


def test_section_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_config(write(tmp_path, "train: 3\n"))


@pytest.mark.parametrize(
    "pair, message",
    [
        ("x", "key=value"),
        ("a=1", "section.option"),
        ("a.b.c=1", "section.option"),
        (".lr=1", "section.option"),
        ("train.=1", "section.option"),
    ],
)
def test_malformed_set(pair, message):
    with pytest.raises(ConfigError, match=message):
        parse_overrides([pair])


def test_parse_overrides_builds_nested_tree():
    tree = parse_overrides(["train.lr=0.1", "train.epochs=2", "run.name=x=y", "data.dir=", "run.dir='a b'"])
    assert tree == {"train": {"lr": "0.1", "epochs": "2"}, "run": {"name": "x=y", "dir": "a b"}, "data": {"dir": ""}}


VALIDATION = [
    ("data.voxel=3", "data.voxel"),
    ("data.cache=yes", "data.cache"),
    ("train.amp=fp16", "train.amp"),
    ("data.test_fraction=0", "data.test_fraction"),
    ("data.test_fraction=1", "data.test_fraction"),
    ("data.seed=-1", "data.seed"),
    ("data.distribution=weird", "data.distribution"),
    ("data.subjects=19", "data.subjects"),
    ("data.workers=-1", "data.workers"),
    ("data.workers=10000", "data.workers"),  # 10000 processes per rank every epoch: the node's pid table, its memory
    ("data.workers=2", "data.cache=off"),  # workers with a cache only pass cached batches through shared memory
    ("model.width=0", "model.width"),
    ("model.pools=6", "model.pools"),
    ("model.pools=-1", "model.pools"),
    ("model.dropout=1", "model.dropout"),
    ("model.init=he", "model.init"),
    ("model.norm_eps=0", "model.norm_eps"),
    ("train.epochs=0", "train.epochs"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.lr=0", "train.lr"),
    ("train.momentum=1", "train.momentum"),
    ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.prox_mu=-0.1", "train.prox_mu"),
    ("train.device=tpu", "train.device"),
    ("train.threads=-1", "train.threads"),
    ("train.threads=2147483648", "train.threads"),  # torch.set_num_threads raised once MPI had started
    ("federation.algorithm=fedprox", "federation.algorithm"),
    ("federation.learners=0", "federation.learners"),
    ("federation.rounds=0", "federation.rounds"),
    ("federation.target=1", "federation.target"),
    ("federation.target=-0.1", "federation.target"),
    ("federation.schedule=linear", "federation.schedule"),
    ("federation.start=0", "federation.start"),
    ("federation.frequency=0", "federation.frequency"),
    ("federation.exponent=0", "federation.exponent"),
    ("federation.fraction=0", "federation.fraction"),
    ("federation.fraction=1", "federation.fraction"),
    ("federation.oneshot_round=0", "federation.oneshot_round"),
    ("federation.oneshot_round=26", "federation.oneshot_round"),
    ("federation.reconfigure_every=0", "federation.reconfigure_every"),
    ("federation.reconfigure_fraction=0", "federation.reconfigure_fraction"),
    ("federation.reconfigure_fraction=1.5", "federation.reconfigure_fraction"),
    ("federation.merge=mean", "federation.merge"),
    ("eval.every=0", "eval.every"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("run.name=", "run.name"),
    ("run.name=a/b", "run.name"),
    ("run.name=a\tb", "run.name"),  # a control character prints invisibly in every message naming the run
    ("run.checkpoint_every=-1", "run.checkpoint_every"),
    ("run.keep_checkpoints=0", "run.keep_checkpoints"),
    ("run.round_timeout=0", "run.round_timeout"),
    ("run.startup_timeout=0", "run.startup_timeout"),
    # values that passed and then overflowed after MPI had started (signal.alarm, the int64 round header, torch)
    ("run.startup_timeout=1e10", "run.startup_timeout"),
    ("run.round_timeout=1e300", "run.round_timeout"),
    ("run.round_timeout=inf", "run.round_timeout"),
    ("run.seed=18446744073709551616", "run.seed"),
    ("data.seed=18446744073709551616", "data.seed"),
]


@pytest.mark.parametrize("pair, option", VALIDATION, ids=[p for p, _ in VALIDATION])
def test_validation_rule_names_the_option(pair, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        load_config(overrides=["federation.algorithm=oneshot", pair] if "oneshot" in pair else [pair])


def test_the_fraction_schedule_is_not_checked_against_the_end_it_never_reads():
    assert load_config(overrides=["federation.schedule=fraction", "federation.start=6", "federation.end=4"])
    with pytest.raises(ConfigError, match=r"federation\.rounds must exceed federation\.start"):
        load_config(overrides=["federation.schedule=fraction", "federation.start=25"])


def test_options_an_algorithm_never_reads_are_not_checked_against_the_rounds():
    assert load_config(overrides=["federation.algorithm=fedavg", "federation.rounds=1", "federation.oneshot_round=2"])
    assert load_config(overrides=["federation.algorithm=snip", "federation.rounds=3", "federation.end=9"])
    with pytest.raises(ConfigError, match=r"federation\.end"):
        load_config(overrides=["federation.rounds=3", "federation.end=9"])  # the cubic schedule reads it


def test_validation_list_covers_every_option():
    """A new option without a validation example shows up here (strings and bools excepted)."""
    tested = {p.split("=")[0] for p, _ in VALIDATION}
    unchecked = {
        "data.dir",
        "data.cache_dir",
        "data.cache",
        "run.dir",
        "run.seed",
        "run.verbose",
        "federation.end",
        "federation.vote_cap",
        "train.channels_last",
        "train.cudnn_benchmark",
        "train.deterministic",
    }
    assert {f"{s}.{o}" for s, o in options()} - tested <= unchecked


def test_progressive_schedule_needs_rounds_after_start():
    bad = ["federation.start=5", "federation.rounds=5"]
    with pytest.raises(ConfigError, match=r"federation.rounds must exceed federation.start"):
        load_config(overrides=bad)
    for algo in ("fedavg", "oneshot", "snip", "centralized"):
        assert load_config(overrides=[*bad, f"federation.algorithm={algo}"]).federation.algorithm == algo


@pytest.mark.parametrize("end, ok", [(0, True), (2, False), (3, True), (10, True), (11, False), (-1, False)])
def test_federation_end_is_zero_or_within_start_and_rounds(end, ok):
    overrides = ["federation.start=2", "federation.rounds=10", f"federation.end={end}"]
    if ok:
        assert load_config(overrides=overrides).federation.end == end
    else:
        with pytest.raises(ConfigError, match=r"federation.end must be 0"):
            load_config(overrides=overrides)


@pytest.mark.parametrize("name", ["..", "."])
def test_run_name_rejects_dot_names(name):
    with pytest.raises(ConfigError, match=r"run.name"):
        load_config(overrides=[f"run.name={name}"])


def test_exponent_must_be_finite():
    with pytest.raises(ConfigError, match=r"federation.exponent"):
        load_config(overrides=["federation.exponent=.inf"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path)  # a directory is not a config file


def test_config_file_not_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [1, 2\n  lr: {"))


def test_a_yaml_error_is_one_line_naming_the_files_lines(tmp_path):
    """PyYAML's text named the source "<unicode string>" and took six lines to quote the file back."""
    path = write(tmp_path, "run:\n  name: x\ntrain:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (
        f"config file {path} is not valid YAML: line 6, column 3: found duplicate key 'lr' "
        "(while constructing a mapping from line 4)"
    )
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "train:\n  lr: 0.1\n  epochs: 2: 3\n"))
    assert str(e.value).endswith("not valid YAML: line 3, column 12: mapping values are not allowed here"), e.value
    with pytest.raises(ConfigError) as e:  # a control character: PyYAML's ReaderError, "<unicode string>" again
        load_config(write(tmp_path, "train:\n  lr: 0.1\x00\n"))
    assert str(e.value) == (
        f"config file {tmp_path / 'c.yaml'} is not valid YAML: character 17: unacceptable character #x0000 "
        "(special characters are not allowed)"
    )


@pytest.mark.parametrize(
    "encoding, where",
    [("latin-1", "byte 0xe9 at offset 17"), ("utf-16", "byte 0xff at offset 0"), ("cp1252", "byte 0x93")],
)
def test_config_file_not_utf8_names_the_file(tmp_path, encoding, where):
    path = tmp_path / "c.yaml"
    path.write_bytes("run:\n  name: \u201cdurée\u201d\n".encode(encoding, errors="replace"))
    with pytest.raises(ConfigError, match=f"config file {path} is not UTF-8 text \\({where}"):
        load_config(path)


def test_a_config_file_that_cannot_be_read_is_one_line(tmp_path, monkeypatch):
    """A file without read permission (or an I/O error) was a PermissionError's traceback and exit 1 on every rank
    (seen with --config /proc/sys/vm/drop_caches, which root may not read either)."""
    path = write(tmp_path, "run:\n  name: x\n")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(ConfigError, match=f"^config file {path} cannot be read: Permission denied$"):
        load_config(path)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", "3\n"])
def test_config_file_not_a_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, text))


def test_empty_config_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n")).to_dict() == Config().to_dict()


SHIPPED = sorted(CONFIGS.rglob("*.yaml"))


def test_shipped_configs_exist():
    assert len(SHIPPED) > 2 and CONFIGS / "cpu.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(CONFIGS)) for p in SHIPPED])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_paper_config_name_matches_file():
    paper = [p for p in SHIPPED if p.parent.parent.name == "paper"]
    assert {p.parent.name for p in paper} == {"original", "pytorch"}
    for path in paper:
        cfg = load_config(path)
        assert cfg.run.name == path.stem and cfg.run.dir.endswith(path.parent.name)
        assert path.stem.startswith(cfg.federation.algorithm)
        assert cfg.data.dir.rsplit("split-", 1)[1] in path.stem


def test_paper_families_are_the_papers_two_setups():
    original = load_config(CONFIGS / "paper" / "original" / "fedavg-uniform-iid.yaml")
    assert (original.train.lr, original.train.batch_size, original.train.momentum) == (5e-5, 1, 0.0)
    assert (original.model.dropout, original.model.init, original.model.norm_eps) == (0.0, "glorot", 1e-3)
    later = load_config(CONFIGS / "paper" / "pytorch" / "fedavg-uniform-iid.yaml")
    assert (later.train.lr, later.train.batch_size, later.model.dropout, later.model.init) == (1e-3, 4, 0.5, "torch")


def test_describe_lists_every_option_with_help():
    text = describe()
    lines = text.splitlines()
    cfg = Config()
    assert len(lines) == len(options())
    for section, name in options():
        field = next(f for f in dataclasses.fields(getattr(cfg, section)) if f.name == name)
        line = next(ln for ln in lines if ln.strip().startswith(f"{section}.{name} = "))
        assert field.metadata["help"] in line
        assert repr(getattr(getattr(cfg, section), name)) in line


def test_config_from_dict_round_trip():
    cfg = load_config(overrides=["federation.algorithm=oneshot", "train.lr=0.02", "run.name=x", "data.cache=off"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert again.to_json() == cfg.to_json()


def test_config_from_dict_validates():
    with pytest.raises(ConfigError, match=r"train.epochs"):
        config_from_dict({"train": {"epochs": 0}})


def test_run_dir_and_schedule_end():
    cfg = load_config(overrides=["run.dir=/tmp/r", "run.name=exp", "federation.rounds=12"])
    assert cfg.run_dir == Path("/tmp/r/exp")
    assert cfg.schedule_end == 12
    assert load_config(overrides=["federation.rounds=12", "federation.end=10"]).schedule_end == 10


def test_records_of_earlier_versions_stay_readable():
    """data.cache was a bool: configs written then (YAML, --set, config.json of old runs) still load."""
    assert config_from_dict({"data": {"cache": True}}).data.cache == "memory"
    assert config_from_dict({"data": {"cache": False}}).data.cache == "off"
    assert load_config(overrides=["data.cache=false"]).data.cache == "off"
    with pytest.raises(ConfigError, match=r"data\.cache must be one of"):
        load_config(overrides=["data.cache=yes"])


@pytest.mark.parametrize("raw", ["on", "ON", "'on'"])
def test_bool_on_is_true(raw):
    assert load_config(overrides=[f"train.channels_last={raw}"]).train.channels_last is True


def test_bool_from_yaml_accepts_only_0_and_1_as_integers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  channels_last: 1\n")
    assert load_config(path).train.channels_last is True
    path.write_text("train:\n  channels_last: 2\n")
    with pytest.raises(ConfigError, match=r"train.channels_last: expected true or false"):
        load_config(path)


def test_quoted_empty_value_is_empty():
    assert parse_overrides(["data.dir=''", 'run.dir=""']) == {"data": {"dir": ""}, "run": {"dir": ""}}
    assert load_config(overrides=["data.dir=''"]).data.dir == ""


BOUNDARIES = [
    ["model.pools=5"],  # the paper's 2 mm model
    ["data.subjects=20"],
    ["federation.reconfigure_fraction=1"],  # documented: 1 keeps the top importances alone
    ["federation.algorithm=oneshot", "federation.rounds=25", "federation.oneshot_round=25"],
]


@pytest.mark.parametrize("pairs", BOUNDARIES, ids=[p[-1] for p in BOUNDARIES])
def test_validation_accepts_the_inclusive_bounds(pairs):
    cfg = load_config(overrides=pairs)
    section, option = pairs[-1].split("=")[0].split(".")
    assert str(getattr(getattr(cfg, section), option)) in (pairs[-1].split("=")[1], pairs[-1].split("=")[1] + ".0")


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n", "'lr'"),
        ("train:\n  lr: 0.1\nrun:\n  name: x\ntrain:\n  epochs: 2\n", "'train'"),  # the first train: was dropped
        ("train: {lr: 0.1, 'lr': 0.2}\n", "'lr'"),
    ],
)
def test_a_key_given_twice_in_a_config_file_is_refused_not_the_last_taken(tmp_path, text, key):
    """YAML forbids a key twice in one mapping, but PyYAML kept the last silently: a second `train:` section
    further down a long file threw away every option of the first."""
    with pytest.raises(ConfigError, match=f"(?s)not valid YAML: .*found duplicate key {key}"):
        load_config(write(tmp_path, text))


def test_a_merge_key_may_still_be_overridden_by_the_mapping_that_merges_it(tmp_path):
    path = write(tmp_path, "train:\n  <<: {lr: 0.1, epochs: 2}\n  lr: 0.3\n")
    assert (load_config(path).train.lr, load_config(path).train.epochs) == (0.3, 2)


@pytest.mark.parametrize("given", ["run.seed=12345678901234567891", "run.seed='12345678901234567891'"])
def test_a_large_integer_on_the_command_line_is_kept_exactly(given):
    """--set run.seed=12345678901234567891 went through a float and trained with seed 12345678901234567168, silently
    (the same seed in a config file was kept exactly)."""
    assert load_config(overrides=[given]).run.seed == 12345678901234567891


def test_a_large_integer_quoted_in_a_config_file_is_kept_exactly(tmp_path):
    assert load_config(write(tmp_path, "run:\n  seed: '12345678901234567891'\n")).run.seed == 12345678901234567891


def test_a_section_whose_options_are_all_commented_out_means_its_defaults(tmp_path):
    """`train:` followed only by commented-out options is a null section in YAML: it was refused ("train: expected
    a mapping of options"), while an empty file means the defaults."""
    cfg = load_config(write(tmp_path, "train:\n#  lr: 0.1\nrun:\n  name: x\n"))
    assert (cfg.train, cfg.run.name) == (Config().train, "x")


def test_a_mapping_anchored_inside_a_merge_key_is_not_refused_when_used_again(tmp_path):
    """PyYAML writes a merge into its mapping node (the `<<` replaced by the merged keys) before constructing it: an
    anchor defined inside a `<<` and aliased later was refused as 'found duplicate key' for the merged key."""
    text = "base: &b {lr: 0.1}\nfast: {<<: &f {<<: *b, lr: 0.3}, epochs: 2}\ntrain: *f\n"
    assert yaml.load(text, Loader=UniqueKeyLoader)["train"] == {"lr": 0.3}
    with pytest.raises(yaml.constructor.ConstructorError, match="found duplicate key 'lr'"):
        yaml.load("train: {<<: {lr: 0.1, lr: 0.2}}\n", Loader=UniqueKeyLoader)  # checked where it is only merged


def test_setting_changes_name_options_on_either_side():
    assert setting_changes({"f": {"a": 1, "old": 2}}, {"f": {"a": 1, "new": 3}}) == [
        "f.new: None -> 3",
        "f.old: 2 -> None",
    ]
