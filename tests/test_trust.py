"""Trust boundaries the server enforces: a device cannot buy influence with the sample count it claims, a
fine-tuning update cannot overwrite a plan's weights, and a refused device stays findable by what it claimed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from cut import wire
from cut.messages import Budget, ImportanceReport, TaskProfile
from protocol.records import PROFILE_REC
from server import app as server_app
from server.aggregate import aggregate, check_update
from server.ledger import REJECTED, DeviceRecord, Ledger


def _record(declared: int, used: int) -> DeviceRecord:
    record = DeviceRecord(1)
    record.profile = TaskProfile("d", ("seg",), Budget("params", 0.5), samples_per_task={"seg": declared})
    record.report = ImportanceReport("d", "m", "a" * 64, {"seg": {"g": np.ones(2, np.float32)}}, {"seg": used})
    return record


def test_a_device_cannot_buy_influence_by_claiming_samples():
    most = 32  # num_batches x batch_size of the scoring request
    assert server_app.sample_weights(_record(declared=48, used=32), most) == {"seg": 32.0}
    assert server_app.sample_weights(_record(declared=2**62, used=2**62), most) == {"seg": 32.0}
    assert server_app.sample_weights(_record(declared=10, used=32), most) == {"seg": 10.0}
    honest = [({"seg": {"g": np.array([1.0, 0.0])}}, {"seg": 32.0}) for _ in range(4)]
    hostile = ({"seg": {"g": np.array([0.0, 1.0])}}, server_app.sample_weights(_record(2**62, 2**62), most))
    mean = aggregate([*honest, hostile])["seg"]["g"]
    assert mean[0] == pytest.approx(0.8) and mean[1] == pytest.approx(0.2)  # one device of five: a fifth


def test_an_update_that_would_overwrite_the_plan_is_refused():
    rng = np.random.default_rng(0)
    reference = {"w": rng.normal(size=(8, 8)).astype(np.float32), "bn.running_mean": np.zeros(8, np.float32)}
    small = {"w": reference["w"] * 1.01, "bn.running_mean": np.ones(8, np.float32) * 5}  # stats may move freely
    assert check_update(small, reference) == ""
    scaled = {"w": reference["w"] * 1e6, "bn.running_mean": reference["bn.running_mean"]}
    assert "of their norm" in check_update(scaled, reference)
    flipped = {"w": -reference["w"], "bn.running_mean": reference["bn.running_mean"]}
    assert "of their norm" in check_update(flipped, reference)


def test_a_refused_profile_is_reported_under_the_id_it_claimed(monkeypatch, tmp_path):
    from test_inbound_fuzz import SETTINGS

    bad = wire.encode_profile(TaskProfile("cam-7", ("seg", "bogus"), Budget("params", 0.5)))
    good = wire.encode_profile(TaskProfile("cam-8", ("seg",), Budget("params", 0.5)))
    replies = {n: SimpleNamespace(content=RecordDict({PROFILE_REC: ConfigRecord({"data": data})}))
               for n, data in ((1, bad), (2, good))}
    monkeypatch.setattr(server_app, "exchange", lambda *args, **kwargs: replies)
    base = SimpleNamespace(task_names=("seg", "depth"), canonical=lambda tasks: tuple(tasks), sha256="a" * 64,
                           model=SimpleNamespace(config=SimpleNamespace(to_json=lambda: "{}")))
    ledger = Ledger([1, 2])
    server_app.collect_profiles(None, ledger, SETTINGS, base)
    refused, accepted = ledger.records[1], ledger.records[2]
    assert refused.status == REJECTED and "bogus" in refused.reason
    assert refused.declared_id == "cam-7" and refused.device_id == ""  # labelled, never trusted
    assert accepted.ok and accepted.device_id == "cam-8"


# ------------------------------------------------------------------------------------------- identity
# A device is the node Flower authenticated; the device id it declares is a label. The tests drive the
# profile phase with canned replies and a grid that reports each node's public key, as Flower's does.


def _ec_key_pem(seed: int) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.derive_private_key(seed, ec.SECP384R1())
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class _Grid:
    """What collect_profiles asks of Flower's Grid: the nodes, each with the public key it registered."""

    def __init__(self, keys: dict[int, bytes]) -> None:
        self.keys = keys

    def get_nodes(self):
        return [SimpleNamespace(node_id=n, public_key=k) for n, k in self.keys.items()]

    def get_node_ids(self):
        return list(self.keys)


def _profiles(monkeypatch, claims: dict[int, str], keys: dict[int, bytes], settings=None, state=None) -> Ledger:
    """Run the profile phase: node -> the device id it claims, answering in this order."""
    from test_inbound_fuzz import SETTINGS

    replies = {n: SimpleNamespace(content=RecordDict({PROFILE_REC: ConfigRecord(
        {"data": wire.encode_profile(TaskProfile(device_id, ("seg",), Budget("params", 0.5)))})}))
        for n, device_id in claims.items()}
    monkeypatch.setattr(server_app, "exchange", lambda *args, **kwargs: replies)
    base = SimpleNamespace(task_names=("seg", "depth"), canonical=lambda tasks: tuple(tasks), sha256="a" * 64,
                           model=SimpleNamespace(config=SimpleNamespace(to_json=lambda: "{}")))
    ledger = Ledger(list(claims))
    kwargs = {} if state is None else {"state": state}
    server_app.collect_profiles(_Grid(keys), ledger, settings or SETTINGS, base, **kwargs)
    return ledger


def test_a_clashing_device_id_rejects_the_newcomer_and_keeps_the_earlier_device(monkeypatch):
    ledger = _profiles(monkeypatch, {7: "dev-a", 3: "dev-a", 5: "dev-b"}, {7: _ec_key_pem(1), 3: _ec_key_pem(2),
                                                                          5: _ec_key_pem(3)})
    first, newcomer, other = ledger.records[7], ledger.records[3], ledger.records[5]
    assert first.ok and first.device_id == "dev-a"  # never evicted
    assert newcomer.status == REJECTED and "'dev-a' is already taken by node 7" in newcomer.reason
    assert newcomer.declared_id == "dev-a" and newcomer.device_id == ""
    assert other.ok and other.device_id == "dev-b"


def test_a_pinned_device_id_is_refused_to_a_node_that_does_not_hold_its_key(monkeypatch):
    import dataclasses

    from test_inbound_fuzz import SETTINGS

    from server.identity import key_fingerprint
    from server.settings import IdentitySettings

    honest, squatter = _ec_key_pem(11), _ec_key_pem(12)
    settings = dataclasses.replace(SETTINGS, identity=IdentitySettings(
        pinned_ids={"dev-a": key_fingerprint(honest), "dev-c": "42"}))
    # The squatter answers first, claiming the honest device's pinned id; a pinned node claims another id.
    ledger = _profiles(monkeypatch, {1: "dev-a", 2: "dev-a", 42: "dev-d", 43: "dev-c"},
                       {1: squatter, 2: honest, 42: _ec_key_pem(13), 43: _ec_key_pem(14)}, settings)
    assert ledger.records[1].status == REJECTED and "pinned" in ledger.records[1].reason
    assert key_fingerprint(honest) in ledger.records[1].reason and key_fingerprint(squatter) in ledger.records[1].reason
    assert ledger.records[2].ok and ledger.records[2].device_id == "dev-a"
    assert ledger.records[2].node_key == key_fingerprint(honest)
    assert ledger.records[42].status == REJECTED and "pinned to device id 'dev-c'" in ledger.records[42].reason
    assert ledger.records[43].status == REJECTED and "node 42" in ledger.records[43].reason


def test_a_resumed_run_binds_restored_device_ids_to_the_key_that_held_them(monkeypatch, tmp_path):
    from server.identity import key_fingerprint
    from server.rundir import RunState

    honest, squatter, newcomer = _ec_key_pem(21), _ec_key_pem(22), _ec_key_pem(23)
    first = RunState(tmp_path, "a" * 64, "test", resume=False)
    ledger = _profiles(monkeypatch, {10: "dev-a"}, {10: honest}, state=first)
    assert ledger.records[10].ok
    # After the restart the SuperNodes reconnect with new node ids; the squatter answers first.
    resumed = RunState(tmp_path, "a" * 64, "test", resume=True)
    ledger = _profiles(monkeypatch, {31: "dev-a", 32: "dev-a", 33: "dev-n"}, {31: squatter, 32: honest, 33: newcomer},
                       state=resumed)
    assert ledger.records[31].status == REJECTED
    assert "held by the node with key" in ledger.records[31].reason and key_fingerprint(honest) in ledger.records[31].reason
    assert ledger.records[32].ok and ledger.records[32].device_id == "dev-a"
    assert ledger.records[33].ok
    # Simulated nodes have no public key (Flower registers random bytes): nothing to bind, first come first served.
    sim = RunState(tmp_path / "sim", "a" * 64, "test", resume=False)
    _profiles(monkeypatch, {1: "dev-s"}, {1: bytes(range(32))}, state=sim)
    ledger = _profiles(monkeypatch, {2: "dev-s"}, {2: b"\x02" * 32}, state=RunState(tmp_path / "sim", "a" * 64,
                                                                                   "test", resume=True))
    assert ledger.records[2].ok and ledger.records[2].node_key == ""


@pytest.mark.parametrize("value, fragment", [
    ("SHA256:short", "SHA256:"), ("node-7", "node id"), ("0", "node id"), ("", "node id")])
def test_a_bad_pin_is_one_clear_error(value, fragment, tmp_path):
    from server.settings import load_settings

    path = tmp_path / "pins.toml"
    path.write_text(f'[identity]\npinned_ids = {{ "dev-a" = "{value}" }}\n')
    with pytest.raises(ValueError, match=r"\[identity\] pinned_ids") as error:
        load_settings(path)
    assert fragment in str(error.value)


def test_key_fingerprint_is_openssh_s_and_empty_for_anything_but_a_key():
    import secrets

    from cryptography.hazmat.primitives import serialization

    from server.identity import key_fingerprint

    pem = _ec_key_pem(5)
    openssh = serialization.load_pem_public_key(pem).public_bytes(serialization.Encoding.OpenSSH,
                                                                  serialization.PublicFormat.OpenSSH)
    assert key_fingerprint(pem) == key_fingerprint(openssh + b" node-0\n") != ""
    for _ in range(500):  # what simulation registers as a node's key: random bytes, never an error
        assert key_fingerprint(secrets.token_bytes(32)) == ""
    assert key_fingerprint(b"") == key_fingerprint(b"ssh-ed25519 AAAA") == ""


# ------------------------------------------------------------------------------------ fine-tune updates
# A fine-tune round is driven with canned replies: three devices share one plan; each update is the
# plan's weights plus a delta (what a few local distillation steps would move them by).


def _finetune(monkeypatch, deltas: dict[int, float | np.ndarray], examples: dict[int, int] | None = None,
              clip_multiple: float | None = None):
    """Run finetune_round for devices node -> delta scale (or array); returns (ledger, reference, adopted)."""
    import dataclasses

    from flwr.app import MetricRecord
    from test_inbound_fuzz import SETTINGS

    from protocol.records import METRICS, WEIGHTS, arrays_record

    rng = np.random.default_rng(3)
    reference = {"w": rng.normal(size=(16, 16)).astype(np.float32), "b": rng.normal(size=16).astype(np.float32),
                 "bn.running_mean": np.zeros(16, np.float32), "bn.num_batches_tracked": np.array(5, np.int64)}
    direction = {n: rng.normal(size=(3, *v.shape)).astype(np.float32) for n, v in reference.items() if n != "bn.num_batches_tracked"}
    updates = {}
    for i, (node, scale) in enumerate(deltas.items()):
        honest = {n: reference[n] + 0.01 * direction[n][i % 3] * np.linalg.norm(reference[n]) / np.sqrt(reference[n].size)
                  for n in direction}
        upd = {n: (reference[n] + scale * (honest[n] - reference[n])).astype(np.float32) for n in direction}
        upd["bn.num_batches_tracked"] = np.array(7, np.int64)
        updates[node] = upd
    examples = examples or {}
    replies = {n: SimpleNamespace(content=RecordDict({WEIGHTS: arrays_record(u), METRICS: MetricRecord(
        {"num_examples": examples.get(n, 64)})})) for n, u in updates.items()}
    monkeypatch.setattr(server_app, "exchange", lambda *args, **kwargs: replies)
    adopted = {}
    book = SimpleNamespace(builds={"p": SimpleNamespace(arrays=reference, weights_sha256="a" * 64)},
                           with_weights=lambda plan_hash, arrays: adopted.update(arrays))
    ledger = Ledger(list(deltas))
    for node in deltas:
        r = ledger.records[node]
        r.device_id, r.plan_hash, r.weights_sha256 = f"dev-{node}", "p", "a" * 64
        r.profile = TaskProfile(r.device_id, ("seg",), Budget("params", 0.5), samples_per_task={"seg": 2**62})
    finetune = SETTINGS.finetune.model_copy(update={"rounds": 1, **({} if clip_multiple is None else
                                                                    {"clip_multiple": clip_multiple})})
    server_app.finetune_round(None, ledger, dataclasses.replace(SETTINGS, finetune=finetune), book, 1)
    return ledger, reference, updates, adopted


def _distance(a: dict, b: dict) -> float:
    names = [n for n in a if "running_" not in n and np.issubdtype(a[n].dtype, np.floating)]
    diff = np.sqrt(sum(np.sum((a[n].astype(np.float64) - b[n]) ** 2) for n in names))
    return float(diff / np.sqrt(sum(np.sum(b[n].astype(np.float64) ** 2) for n in names)))


def test_a_scaled_delta_that_passes_the_norm_check_is_excluded_from_a_group_of_three(monkeypatch):
    """Delta x 10 moves the weights by ~10% of their norm (under check_update's 0.5) and claims 2^62
    examples; the honest group's average must stay within 1% of the attack-free one."""
    _, reference, _, clean = _finetune(monkeypatch, {1: 1.0, 2: 1.0, 3: 1.0})
    ledger, _, updates, attacked = _finetune(monkeypatch, {1: 1.0, 2: 1.0, 3: 10.0}, examples={3: 2**62})
    assert check_update(updates[3], reference) == ""  # the old check lets it through
    assert _distance(attacked, clean) < 0.01, f"moved {_distance(attacked, clean):.3%} from the attack-free average"
    hostile = ledger.records[3]
    assert hostile.status == REJECTED and "median" in hostile.reason and "finetune-1" in hostile.reason
    assert ledger.records[1].ok and ledger.records[2].ok


def test_without_an_outlier_the_group_average_is_plain_fedavg(monkeypatch):
    from server.aggregate import fedavg

    ledger, _, updates, adopted = _finetune(monkeypatch, {1: 1.0, 2: 1.3, 3: 0.8})
    assert all(r.ok for r in ledger)
    expected = fedavg([(u, 64.0) for u in updates.values()])
    for name, value in expected.items():
        np.testing.assert_allclose(adopted[name], value, rtol=1e-6)


@pytest.mark.parametrize("clip_multiple", [None, 1.0, 1.5])
def test_deltas_are_clipped_to_a_multiple_of_the_group_median(monkeypatch, clip_multiple):
    """In a group of two no robust rule can tell who is the outlier; the larger delta is clipped to
    clip_multiple x the group's lower median delta norm (for a pair, the smaller one: with the mean of the
    two as the median, the default 2.0 could never clip a pair). None: the default, 2.0."""
    from server.settings import FinetuneSettings

    ledger, reference, updates, adopted = _finetune(monkeypatch, {1: 1.0, 2: 3.0}, clip_multiple=clip_multiple)
    assert all(r.ok for r in ledger)
    multiple = FinetuneSettings().clip_multiple if clip_multiple is None else clip_multiple
    norm = {n: float(np.sqrt(sum(np.sum((u[k].astype(np.float64) - reference[k]) ** 2)
                                 for k in ("w", "b")))) for n, u in updates.items()}
    bound = multiple * min(norm.values())
    scale = bound / norm[2]
    assert scale < 1  # the larger delta is clipped
    expected = {k: reference[k] + ((updates[1][k] - reference[k]) + scale * (updates[2][k] - reference[k])) / 2
                for k in ("w", "b")}
    for k in ("w", "b"):
        np.testing.assert_allclose(adopted[k], expected[k], rtol=1e-5, atol=1e-6)


def test_a_claimed_example_count_buys_no_more_weight_than_the_groups_median(monkeypatch):
    """The server's cap (steps x batch size = 384 by default) is above what honest devices with their ~100
    samples report; a device claiming 2^62 examples weighs what the group's median device does."""
    from server.aggregate import fedavg

    ledger, _, updates, adopted = _finetune(monkeypatch, {1: 1.0, 2: 1.2, 3: 0.9}, examples={1: 40, 2: 60, 3: 2**62})
    assert all(r.ok for r in ledger)
    expected = fedavg([(updates[1], 40.0), (updates[2], 60.0), (updates[3], 60.0)])
    for name in ("w", "b"):
        np.testing.assert_allclose(adopted[name], expected[name], rtol=1e-6)
