"""The algorithm table, its schedules, per-round seeds and pruning without regrowth."""

import numpy as np
import pytest

from fedmpi.algorithms import ALGORITHMS, algorithm, processes, prune, reconfigures, round_seed, schedule
from fedmpi.config import ConfigError, load_config
from fedmpi.schedule import ConstantSchedule, CubicSchedule, FractionSchedule, OneShotSchedule


def cfg_for(algo, *overrides):
    return load_config(overrides=[f"federation.algorithm={algo}", *overrides])


def test_every_configurable_algorithm_has_an_entry():
    for name, algo in ALGORITHMS.items():
        assert algo.name == name
        assert algo.prune_at in ("server", "learner", "start", "never")
        assert algo.selector in ("magnitude", "random")


@pytest.mark.parametrize(
    "name, prune_at, selector",
    [
        ("fedavg", "never", "magnitude"),
        ("fedsparsify-global", "server", "magnitude"),
        ("fedsparsify-local", "learner", "magnitude"),
        ("oneshot", "server", "magnitude"),
        ("random", "server", "random"),
        ("snip", "start", "magnitude"),
        ("grasp", "start", "magnitude"),
        ("prunefl", "start", "magnitude"),
        ("centralized", "never", "magnitude"),
    ],
)
def test_table(name, prune_at, selector):
    algo = algorithm(cfg_for(name))
    assert (algo.name, algo.prune_at, algo.selector) == (name, prune_at, selector)
    # only Local's learners send their own sparse models (gathered and voted); every other one sums in a mask
    assert algo.shared_mask == (name != "fedsparsify-local")


def test_fedavg_never_prunes():
    s = schedule(cfg_for("fedavg", "federation.target=0.9"))
    assert isinstance(s, ConstantSchedule)
    assert [s(t) for t in range(0, 26)] == [0.0] * 26


def test_snip_is_constant_target():
    s = schedule(cfg_for("snip", "federation.target=0.8"))
    assert isinstance(s, ConstantSchedule)
    assert {s(t) for t in range(0, 26)} == {0.8}
    assert not any(s(t) != s(t - 1) for t in range(1, 26))


@pytest.mark.parametrize("name", ["snip", "grasp", "prunefl"])
def test_start_mask_algorithms_hold_the_target_from_the_start(name):
    algo = ALGORITHMS[name]
    assert algo.start_mask == name and algo.prune_at == "start" and algo.shared_mask
    s = schedule(cfg_for(name, "federation.target=0.8"))
    assert {s(t) for t in range(0, 26)} == {0.8}


def test_only_prunefl_regrows_and_trains_before_its_start_mask():
    assert {name for name, a in ALGORITHMS.items() if a.regrows} == {"prunefl"}
    assert {name for name, a in ALGORITHMS.items() if a.start_trains} == {"prunefl"}
    for algo in ALGORITHMS.values():
        if algo.regrows:  # the server sums the learners' squared gradients with the values: a shared mask
            assert algo.shared_mask and algo.start_mask


def test_reconfiguration_rounds():
    cfg = cfg_for("prunefl", "federation.rounds=12", "federation.reconfigure_every=4")
    assert [t for t in range(1, 13) if reconfigures(cfg, t)] == [4, 8]  # never the last round
    cfg = cfg_for("prunefl", "federation.rounds=10", "federation.reconfigure_every=3")
    assert [t for t in range(1, 11) if reconfigures(cfg, t)] == [3, 6, 9]
    for name, algo in ALGORITHMS.items():
        if not algo.regrows:
            cfg = cfg_for(name, "federation.rounds=12", "federation.reconfigure_every=1")
            assert not any(reconfigures(cfg, t) for t in range(1, 13))


def test_oneshot_prunes_once_at_its_round():
    s = schedule(cfg_for("oneshot", "federation.target=0.9", "federation.oneshot_round=4"))
    assert isinstance(s, OneShotSchedule)
    assert [s(t) for t in range(1, 4)] == [0.0, 0.0, 0.0]
    assert [s(t) for t in range(4, 26)] == [0.9] * 22
    assert [t for t in range(1, 26) if s(t) != s(t - 1)] == [4]


@pytest.mark.parametrize("algo", ["fedsparsify-global", "fedsparsify-local", "random"])
def test_cubic_schedule_reaches_target_at_schedule_end(algo):
    cfg = cfg_for(algo, "federation.target=0.95", "federation.rounds=12", "federation.end=10")
    s = schedule(cfg)
    assert isinstance(s, CubicSchedule)
    assert cfg.schedule_end == 10
    assert s(1) == 0.0
    assert 0 < s(2) < s(5) < s(9) < 0.95
    assert s(10) == s(11) == s(12) == 0.95


def test_cubic_schedule_end_defaults_to_last_round():
    cfg = cfg_for("fedsparsify-global", "federation.rounds=25")
    s = schedule(cfg)
    assert s(24) < cfg.federation.target == s(25)


def test_cubic_schedule_uses_start_frequency_exponent():
    cfg = cfg_for(
        "fedsparsify-global",
        "federation.start=3",
        "federation.frequency=2",
        "federation.exponent=2",
        "federation.rounds=11",
        "federation.target=0.5",
    )
    s = schedule(cfg)
    assert s(1) == s(2) == s(3) == 0.0
    assert s(4) == s(5) > 0  # pruning in the even rounds from round 3 on
    assert s(4) == pytest.approx(0.5 * (1 - (1 - 1 / 8) ** 2))
    assert s(6) == pytest.approx(0.5 * (1 - (1 - 3 / 8) ** 2))


def test_fraction_schedule():
    cfg = cfg_for(
        "fedsparsify-global",
        "federation.schedule=fraction",
        "federation.fraction=0.1",
        "federation.frequency=2",
        "federation.start=2",
        "federation.target=0.2",
    )
    s = schedule(cfg)
    assert isinstance(s, FractionSchedule)
    assert s(1) == 0.0
    assert s(2) == s(3) == pytest.approx(0.1)
    assert s(4) == pytest.approx(0.19)
    assert s(6) == s(25) == 0.2  # capped at the target


def test_round_seed_is_deterministic_and_distinct():
    assert round_seed(0, 3, 2) == round_seed(0, 3, 2)
    seeds = {round_seed(seed, t, rank) for seed in range(3) for t in range(20) for rank in range(9)}
    assert len(seeds) == 3 * 20 * 9
    assert round_seed(0, 1, 2) != round_seed(0, 2, 1)
    assert isinstance(round_seed(0, 1, 1), int) and 0 <= round_seed(0, 1, 1) < 2**32


def test_round_seed_is_pinned():
    """Resuming bit for bit needs the same seeds as the run that wrote the checkpoint."""
    assert round_seed(7, 3, 1) == 1060801321
    assert round_seed(0, 0, 0) == 2968811710


def test_negative_seed_is_rejected_up_front():
    """round_seed (SeedSequence) needs a non-negative seed, so the config refuses others."""
    with pytest.raises(ConfigError, match=r"run.seed must be in \[0, 2\*\*64\), got -1"):
        load_config(overrides=["run.seed=-1"])


@pytest.mark.parametrize("selector", ["magnitude", "random"])
def test_prune_exact_count_and_no_regrowth(selector):
    rng = np.random.default_rng(1)
    n = 1001
    values = rng.standard_normal(n).astype(np.float32)
    mask = np.ones(n, dtype=bool)
    for i, s in enumerate([0.1, 0.35, 0.35, 0.6, 0.9, 0.95]):
        new = prune(values, mask, s, selector, seed=i)
        assert new is not mask
        assert n - new.sum() == round(s * n)
        assert not (new & ~mask).any()  # nothing pruned comes back
        values = np.where(new, values, 1000.0).astype(np.float32)  # pruned positions look worth keeping
        mask = new
    assert mask.sum() == n - round(0.95 * n)


def test_magnitude_keeps_the_largest():
    values = np.array([0.1, -5.0, 0.3, 2.0, -0.2, 4.0])
    mask = prune(values, np.ones(6, bool), 0.5, "magnitude", seed=0)
    np.testing.assert_array_equal(mask, [False, True, False, True, False, True])


def test_magnitude_does_not_revive_large_pruned_values():
    values = np.array([100.0, 1.0, 2.0, 3.0])
    mask = np.array([False, True, True, True])
    new = prune(values, mask, 0.5, "magnitude", seed=0)
    np.testing.assert_array_equal(new, [False, False, True, True])


def test_random_selector_reproducible_and_seed_dependent():
    values = np.arange(500, dtype=np.float32)
    start = np.ones(500, dtype=bool)
    a = prune(values, start, 0.5, "random", seed=11)
    b = prune(values, start, 0.5, "random", seed=11)
    c = prune(values, start, 0.5, "random", seed=12)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert not np.array_equal(a, values >= 250)  # not the magnitude choice
    assert start.all()  # the input mask is not modified


def test_unused_options_follow_the_table():
    local, glob, prunefl = ALGORITHMS["fedsparsify-local"], ALGORITHMS["fedsparsify-global"], ALGORITHMS["prunefl"]
    assert not {"merge", "vote_cap", "exponent", "end"} & local.unused_options("cubic")
    assert {"merge", "vote_cap", "oneshot_round", "fraction", "reconfigure_every"} <= glob.unused_options("cubic")
    assert {"end", "exponent"} <= glob.unused_options("fraction") and "fraction" not in glob.unused_options("fraction")
    assert "target" in ALGORITHMS["fedavg"].unused_options("cubic") and "target" not in prunefl.unused_options("cubic")
    assert not {"reconfigure_every", "reconfigure_fraction"} & prunefl.unused_options("cubic")
    assert "oneshot_round" not in ALGORITHMS["oneshot"].unused_options("cubic")


def test_only_prunefl_reads_the_reconfiguration_options():
    for name, algo in ALGORITHMS.items():
        unused = algo.unused_options("cubic")
        assert ({"reconfigure_every", "reconfigure_fraction"} <= unused) == (not algo.regrows), name


def test_oneshot_reads_no_schedule_option():
    unused = ALGORITHMS["oneshot"].unused_options("cubic")
    assert {"schedule", "start", "end", "frequency", "exponent", "fraction"} <= unused
    # so its rounds are not checked against federation.end
    assert load_config(overrides=["federation.algorithm=oneshot", "federation.rounds=3", "federation.end=9"])


def test_a_dense_run_aims_at_no_sparsity_whatever_federation_target_says():
    from fedmpi.algorithms import target_sparsity

    assert target_sparsity(cfg_for("fedavg", "federation.target=0.95")) == 0.0
    assert target_sparsity(cfg_for("centralized", "federation.target=0.95")) == 0.0
    assert target_sparsity(cfg_for("fedsparsify-global", "federation.target=0.9")) == 0.9


def test_the_server_prunes_the_global_model_where_the_table_says():
    """Global, oneshot and random prune at the server; Local only under vote_cap; the start-mask algorithms
    hold their start mask and the dense ones never prune."""
    pruners = {"fedsparsify-global", "oneshot", "random"}
    for name, algo in ALGORITHMS.items():
        assert algo.server_prunes(False) == (name in pruners), name
        assert algo.server_prunes(True) == (name in pruners | {"fedsparsify-local"}), name
        assert algo.progressive == (name in {"fedsparsify-global", "fedsparsify-local", "random"}), name


def test_fraction_schedule_starts_at_federation_start():
    """federation.start = 3 with f = 1: the first pruning is in round 3, not 1 (start 2 with f = 2, above, is the
    same schedule as start 1, so it cannot tell whether start reaches the schedule)."""
    cfg = cfg_for(
        "fedsparsify-global",
        "federation.schedule=fraction",
        "federation.fraction=0.5",
        "federation.frequency=1",
        "federation.start=3",
        "federation.target=0.9",
    )
    s = schedule(cfg)
    assert [s(t) for t in range(1, 6)] == pytest.approx([0.0, 0.0, 0.5, 0.75, 0.875])


def test_only_centralized_trains_centrally():
    assert {name for name, a in ALGORITHMS.items() if a.trains_centrally} == {"centralized"}


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_a_run_takes_its_server_and_learners_or_one_process_for_a_central_baseline(algo):
    """The one rule for the job's size (launch's rank checks, the sweep's mpirun -n and sbatch --ntasks)."""
    want = 1 if ALGORITHMS[algo].trains_centrally else 5
    assert processes(cfg_for(algo, "federation.learners=4")) == want
