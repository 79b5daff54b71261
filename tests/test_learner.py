"""The learner loop driven by an in-process stand-in for the server (no MPI): what it trains on, what it
reports, and what it sends for each kind of algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedtools import write_split

from fedmpi import encoding, pruning
from fedmpi.algorithms import ALGORITHMS, prune, round_seed
from fedmpi.config import load_config
from fedmpi.data import VolumeDataset
from fedmpi.errors import PayloadError
from fedmpi.learner import GRASP_SAMPLES, START_MASKS, Learner
from fedmpi.messages import REPORT, records
from fedmpi.model import build_model, flat_parameters, load_flat_parameters
from fedmpi.training import grasp_scores, local_train, masks_from_flat
from fedmpi.wire import FLAG_MASK, FLAG_STOP


class ServerStandIn:
    """Plays the server for learner 1: hands out the queued models, keeps what the learner sends."""

    rank = 1
    deadline = None
    learners = 2

    def __init__(self, models):
        self.models = list(models)  # (round, flags, nnz, payload)
        self.reports, self.reduced, self.gathered, self.sent = [], [], [], []

    def recv_model(self, largest):
        model = self.models.pop(0)
        assert 0 <= model[3].nbytes <= largest, "the Wire refuses a payload size the learner's model cannot take"
        return model

    def report(self, values):
        self.reports.append(records(values, REPORT)[0])

    def reduce_sum(self, buf, what=""):
        self.reduced.append(buf.copy())

    def gatherv(self, buf, what=""):
        self.gathered.append(buf.copy())

    def send(self, buf, dest, what=""):
        self.sent.append(buf.copy())

    def recv(self, buf, source, what=""):
        buf[:] = self.initial
        return buf


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    split = write_split(tmp_path_factory.mktemp("split"), learners=1, per_learner=8, test=4)
    return VolumeDataset(split / "learner_1.h5", cache=True)


def _learner(data, algorithm, *sets):
    cfg = load_config(
        overrides=[
            "model.width=0.125",
            "train.batch_size=4",
            "train.epochs=1",
            "train.lr=0.01",
            "federation.rounds=4",
            "federation.target=0.8",
            f"federation.algorithm={algorithm}",
            *sets,
        ]
    )
    torch.manual_seed(0)
    initial = flat_parameters(build_model(cfg, data.shape))
    return Learner(cfg, None, data, torch.device("cpu"), weight=0.25), initial


def _global(initial, sparsity):
    mask = pruning.magnitude_mask(initial, sparsity)
    return pruning.apply_mask(initial, mask), mask


def _run(learner, models):
    learner.wire = ServerStandIn([*models, (0, FLAG_STOP, 0, np.zeros(0, np.uint8))])
    learner.run()
    return learner.wire


def test_a_header_whose_kept_count_disagrees_with_the_model_is_refused(data):
    """The header's kept count is checked against the mask the learner holds, framing errors surface there."""
    learner, initial = _learner(data, "fedsparsify-global")
    values, mask = _global(initial, 0.5)
    nnz = int(mask.sum())
    with pytest.raises(PayloadError, match=f"round 2: the header says {nnz + 1} kept positions, the model keeps {nnz}"):
        _run(learner, [(2, FLAG_MASK, nnz + 1, encoding.encode(values, mask))])


def test_shared_mask_learner_sends_weighted_values_inside_the_mask(data):
    learner, initial = _learner(data, "fedsparsify-global")
    values, mask = _global(initial, 0.5)
    nnz = int(mask.sum())
    wire = _run(learner, [(2, FLAG_MASK, nnz, encoding.encode(values, mask))])
    (sent,) = wire.reduced
    assert sent.dtype == np.float32 and sent.size == nnz  # only the kept positions travel
    trained = encoding.scatter_values(sent / np.float32(0.25), mask, np.float32)
    assert not trained[~mask].any() and not np.allclose(trained[mask], values[mask])  # it trained, no regrowth
    (report,) = wire.reports
    assert report["samples"] == 8 and report["payload_nbytes"] == sent.nbytes and report["finite"] == 1
    assert np.isfinite(report["loss"]) and report["seconds_train"] > 0


def test_values_only_round_reuses_the_mask_it_was_sent(data):
    learner, initial = _learner(data, "fedavg")
    values, mask = _global(initial, 0.0)
    assert encoding.encode(values, mask).nbytes == learner.largest  # a fully kept model: the bound is its size
    wire = _run(
        learner,
        [
            (1, FLAG_MASK, mask.size, encoding.encode(values, mask)),
            (2, 0, mask.size, values.astype(np.float32).view(np.uint8)),
        ],
    )
    assert len(wire.reduced) == 2 and wire.reduced[1].size == mask.size


def test_local_learner_prunes_its_own_model_to_the_schedule(data):
    learner, initial = _learner(data, "fedsparsify-local")
    values, mask = _global(initial, 0.2)
    wire = _run(learner, [(4, FLAG_MASK, int(mask.sum()), encoding.encode(values, mask))])
    (payload,) = wire.gathered
    local, local_mask = encoding.decode(payload)
    assert 1 - local_mask.mean() == pytest.approx(learner.schedule(4), abs=1e-4)  # s_4 = the target, 0.8
    assert not (local_mask & ~mask).any()  # never revives a position the global mask pruned
    assert not local[~local_mask].any()
    assert wire.reports[0]["payload_nbytes"] == payload.nbytes


@pytest.mark.parametrize("algorithm", ["fedsparsify-global", "fedsparsify-local"])
def test_a_learner_whose_training_diverged_reports_it_instead_of_failing(data, monkeypatch, algorithm):
    """A NaN in the trained model is the server's to refuse, naming the learner (the report's finite flag):
    Local's learner prunes its own model by magnitude, which cannot rank a NaN, so it sends the model
    unpruned in the global mask rather than dying in magnitude_mask."""
    import fedmpi.learner as learner_module

    train_round = learner_module.train_round

    def diverging(cfg, model, *args, **kwargs):
        out = train_round(cfg, model, *args, **kwargs)
        with torch.no_grad():
            first = next(model.parameters()).view(-1)
            first[int(first.nonzero()[0])] = float("nan")  # a kept position
        return out

    monkeypatch.setattr(learner_module, "train_round", diverging)
    learner, initial = _learner(data, algorithm)
    values, mask = _global(initial, 0.2)
    wire = _run(learner, [(4, FLAG_MASK, int(mask.sum()), encoding.encode(values, mask))])
    (report,) = wire.reports
    assert report["finite"] == 0
    (sent,) = wire.reduced or wire.gathered
    assert report["payload_nbytes"] == sent.nbytes
    if algorithm == "fedsparsify-local":
        _, sent_mask = encoding.decode(sent)
        assert np.array_equal(sent_mask, mask)  # not pruned: a NaN has no magnitude rank


def test_local_learner_prunes_to_the_schedule_in_rounds_between_its_steps(data):
    """As the authors' code (its local purge runs every round, at the level of t rounded down to a multiple of
    f): the vote can leave the merged model denser than s_t, so a round where the level does not step still
    prunes the learner's model back to it."""
    learner, initial = _learner(data, "fedsparsify-local", "federation.frequency=2")
    assert learner.schedule(3) == learner.schedule(2) > 0.5  # round 3 is no pruning round
    values, mask = _global(initial, 0.2)  # a vote that kept more than s_3
    _, local_mask = encoding.decode(
        _run(learner, [(3, FLAG_MASK, int(mask.sum()), encoding.encode(values, mask))]).gathered[0]
    )
    assert 1 - local_mask.mean() == pytest.approx(learner.schedule(3), abs=1e-4)


def test_same_round_same_seed_same_model(data):
    sends = []
    for _ in range(2):
        learner, initial = _learner(data, "fedsparsify-global")
        values, mask = _global(initial, 0.5)
        sends.append(_run(learner, [(3, FLAG_MASK, int(mask.sum()), encoding.encode(values, mask))]).reduced[0])
    assert sends[0].tobytes() == sends[1].tobytes()


@pytest.mark.parametrize("algorithm", ["snip", "grasp", "prunefl"])
def test_start_mask_is_chosen_by_the_tables_rule_and_sent_at_the_target(data, algorithm):
    learner, initial = _learner(data, algorithm)
    learner.wire = ServerStandIn([])
    learner.wire.initial = initial
    learner.send_start_mask()
    packed, *values = learner.wire.sent
    mask = encoding.unpack_mask(packed, initial.size)
    assert 1 - mask.mean() == pytest.approx(0.8, abs=1e-4)
    assert len(values) == learner.algo.start_trains  # only a rule that trains sends values
    if learner.algo.start_trains:  # PruneFL: magnitude of the model learner 1 trained, its kept values sent
        trained = flat_parameters(learner.model)
        assert not np.allclose(trained, initial)
        assert np.array_equal(mask, pruning.magnitude_mask(trained, 0.8))
        assert values[0].dtype == np.float32 and np.array_equal(values[0], trained[mask])


def test_grasp_scores_the_first_sixteen_samples_in_round_zeros_order(data):
    learner, initial = _learner(data, "grasp", "train.batch_size=3")
    learner.wire = ServerStandIn([])
    learner.wire.initial = initial
    learner.send_start_mask()
    shuffled = torch.utils.data.DataLoader(
        data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(round_seed(0, 0, 1))
    )
    expected_batches = list(shuffled)  # all 8 samples (fewer than 16), in 3 + 3 + 2
    batches = learner.start_batches(GRASP_SAMPLES)
    assert [x.shape[0] for x, _ in batches] == [3, 3, 2]
    for (x, y), (ex, ey) in zip(batches, expected_batches):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(data.ages.tolist())
    model = build_model(learner.cfg, data.shape)
    load_flat_parameters(model, initial)
    expected = pruning.top_mask(-grasp_scores(model, expected_batches), 0.8)
    assert np.array_equal(encoding.unpack_mask(learner.wire.sent[0], initial.size), expected)


def test_prunefl_learner_sends_squared_gradients_only_in_reconfiguration_rounds(data):
    learner, initial = _learner(data, "prunefl", "federation.reconfigure_every=2")  # 4 rounds: reconfigures at 2
    values, mask = _global(initial, 0.8)
    nnz, n = int(mask.sum()), mask.size
    wire = _run(
        learner,
        [
            (1, FLAG_MASK, nnz, encoding.encode(values, mask)),
            (2, 0, nnz, encoding.gather_values(values, mask).view(np.uint8)),
        ],
    )
    first, second, importance = wire.reduced  # round 1: values; round 2: values, then squared gradients
    assert first.size == second.size == nnz
    assert importance.dtype == np.float32 and importance.size == n and (importance >= 0).all()
    assert (importance[~mask] > 0).mean() > 0.5  # pruned positions have gradients too
    reports = wire.reports
    assert reports[0]["payload_nbytes"] == 4 * nnz
    assert reports[1]["payload_nbytes"] == second.nbytes + importance.nbytes == 4 * nnz + 4 * n
    assert reports[1]["finite"] == 1


def test_every_start_mask_in_the_table_has_a_rule():
    assert {a.start_mask for a in ALGORITHMS.values() if a.start_mask} == set(START_MASKS)


def _trained_by_hand(learner, values, mask, t, rank):
    """Round t's local training done by hand: a model loaded with `values`, the data in the order a fresh
    loader seeded with round_seed(seed, t, rank) draws it, dropout from the same seed, the mask held."""
    cfg = learner.cfg
    seed = round_seed(cfg.run.seed, t, rank)
    model = build_model(cfg, learner.data.shape)
    load_flat_parameters(model, values)
    loader = torch.utils.data.DataLoader(
        learner.data, batch_size=cfg.train.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    torch.manual_seed(seed)
    tc = cfg.train
    local_train(
        model,
        loader,
        epochs=tc.epochs,
        lr=tc.lr,
        momentum=tc.momentum,
        weight_decay=tc.weight_decay,
        masks=masks_from_flat(model, mask),
        device=torch.device("cpu"),
    )
    return flat_parameters(model)


class SecondLearner(ServerStandIn):
    rank = 2


def test_shared_mask_learner_sends_its_weighted_model_trained_with_its_rounds_seed_and_the_mask(data):
    learner, initial = _learner(data, "fedsparsify-global", "model.dropout=0.5")
    values, mask = _global(initial, 0.5)
    values = np.where(mask, values, 1.0).astype(np.float32)  # pruned positions arrive non-zero: the mask must win
    learner.wire = SecondLearner(
        [(3, FLAG_MASK, int(mask.sum()), encoding.encode(values, mask)), (0, FLAG_STOP, 0, np.zeros(0, np.uint8))]
    )
    learner.run()
    (sent,) = learner.wire.reduced
    expected = _trained_by_hand(learner, pruning.apply_mask(values, mask), mask, 3, 2)
    assert np.allclose(sent, expected[mask] * np.float32(0.25), rtol=1e-5, atol=1e-7)


def test_local_learner_prunes_its_trained_model_with_its_rounds_seed(data):
    learner, initial = _learner(data, "fedsparsify-local")
    values, mask = _global(initial, 0.2)
    wire = _run(learner, [(4, FLAG_MASK, int(mask.sum()), encoding.encode(values, mask))])
    local, local_mask = encoding.decode(wire.gathered[0])
    trained = _trained_by_hand(learner, values, mask, 4, 1)
    expected = prune(trained, mask, learner.schedule(4), learner.algo.selector, round_seed(0, 4, 1))
    assert (local_mask != expected).sum() <= 2, (local_mask != expected).sum()
    assert np.allclose(local[local_mask], trained[local_mask], rtol=1e-5, atol=1e-7)


def test_a_header_announcing_fewer_kept_positions_is_refused(data):
    learner, initial = _learner(data, "fedsparsify-global")
    values, mask = _global(initial, 0.5)
    nnz = int(mask.sum())
    with pytest.raises(PayloadError, match=f"the header says {nnz - 1} kept positions, the model keeps {nnz}"):
        _run(learner, [(2, FLAG_MASK, nnz - 1, encoding.encode(values, mask))])


def test_warm_up_trains_no_larger_a_batch_than_the_learners_data_gives(data, monkeypatch):
    """A learner with fewer samples than train.batch_size only ever trains batches of its size: the warm-up step
    must not build (and on a GPU, autotune and allocate for) a batch of train.batch_size zero volumes."""
    import fedmpi.training

    seen = []
    real = fedmpi.training.local_train

    def spy(model, loader, **kwargs):
        seen.extend(int(x.shape[0]) for x, _ in loader)
        return real(model, loader, **kwargs)

    monkeypatch.setattr(fedmpi.training, "local_train", spy)
    _learner(data, "fedavg", "train.batch_size=64")[0].warm_up()
    assert seen == [len(data)]


@pytest.mark.parametrize("t", [-1, 0, 5])
def test_a_header_naming_a_round_outside_the_federation_is_refused(data, t):
    """The round seeds the learner's shuffling and dropout: a negative one was a ValueError from numpy's
    SeedSequence, naming no field, and round 0 or one past federation.rounds (4 here) was trained as any other."""
    learner, initial = _learner(data, "fedsparsify-global")
    values, mask = _global(initial, 0.5)
    with pytest.raises(PayloadError, match=rf"^the server's header names round {t}, outside 1\.\.4$"):
        _run(learner, [(t, FLAG_MASK, int(mask.sum()), encoding.encode(values, mask))])
    assert not learner.wire.reports


@pytest.mark.parametrize("extra", [1, 4])
def test_values_that_do_not_fill_the_kept_positions_are_refused_naming_the_round(data, extra):
    """A values-only payload is a float32 per kept position: one byte more was a ValueError from numpy's view,
    four more an EncodingError, neither naming the round or the server's payload."""
    learner, initial = _learner(data, "fedavg")
    values, mask = _global(initial, 0.5)
    nnz = int(mask.sum())
    sent = np.concatenate([encoding.gather_values(values, mask).view(np.uint8), np.zeros(extra, np.uint8)])
    says = f"^round 2: the server sent {4 * nnz + extra} bytes of values for {nnz} kept positions$"
    with pytest.raises(PayloadError, match=says):
        _run(learner, [(1, FLAG_MASK, nnz, encoding.encode(values, mask)), (2, 0, nnz, sent)])
    assert len(learner.wire.reports) == 1  # round 1 trained, round 2 refused
