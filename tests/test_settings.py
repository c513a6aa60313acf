"""Scenario settings (server.settings): defaults, and every way a scenario file can be wrong failing with one
message that names the file, the section and the key. In process; no Flower, no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocol.phases import Adoption, DataSpec, DeliverConfig, FinetuneConfig, ScoreConfig
from server import settings as S
from server.settings import ScenarioFile, Settings, load_settings, read_scenario, scenario_schema

SECTIONS = tuple(ScenarioFile.model_fields)  # every [section] a scenario file may have


def write(tmp_path: Path, text: str, name: str = "scenario.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ValueError) as info:
        load_settings(path)
    message = str(info.value)
    assert message.startswith(f"scenario {path}: "), message  # names the file first
    assert "\n" not in message  # one line
    return message


# ------------------------------------------------------------------------------------------- defaults


def test_the_expected_sections_are_declared():
    assert {"scenario", "model", "data", "scoring", "planning", "finetune", "evaluation", "device", "timeouts",
            "fleet"} <= set(SECTIONS)


@pytest.mark.parametrize("text", ["", "\n".join(f"[{s}]" for s in SECTIONS)])
def test_an_empty_file_and_empty_sections_give_every_default(tmp_path, text):
    path, parsed = read_scenario(write(tmp_path, text))
    assert parsed == ScenarioFile()
    for section in SECTIONS:
        default = ScenarioFile.model_fields[section].annotation()  # the section's own defaults
        assert getattr(parsed, section) == default, section


def test_the_shipped_default_scenario_states_the_defaults(tmp_path):
    """simulations/default.toml says its values are the defaults: a scenario that leaves every key out gets the
    same settings (a file without [data] once gave devices 6-22 held-out samples and the pre-training seed)."""
    empty = load_settings(write(tmp_path, "", name="default.toml"))
    assert empty == load_settings("default")


def test_section_defaults(tmp_path):
    """The documented defaults; those a device also uses come from protocol.phases (defined once)."""
    settings = load_settings(write(tmp_path, "", name="my-scenario.toml"))
    assert isinstance(settings, Settings)
    assert settings.name == "my-scenario"  # the file's stem
    assert (settings.devices, settings.seed, settings.min_devices, settings.max_in_flight) == (20, 0, 1, 256)
    assert settings.base_model_dir == Path("runs/pretrained-scenes") and settings.transport == ScoreConfig.transport
    assert settings.out_dir == Path("runs") / "simulate" and settings.resume is False
    d = settings.data  # default.toml's: >= 48 held-out samples per device, not the pre-training seed (0)
    assert (d.samples_per_device, d.min_samples, d.eval_fraction, d.seed) == (160, 96, 0.5, 1)
    assert (d.partition, d.alpha) == (DataSpec.partition, DataSpec.alpha)
    s = settings.scoring
    assert (s.criterion, s.num_batches, s.batch_size, s.dtype) == ("fisher", 2, 16, ScoreConfig.dtype)
    assert (s.aggregation, s.clip_norm, s.noise_multiplier, s.dp_delta) == ("weighted-mean", 0.0, 0.0, 1e-5)
    assert (s.trim_fraction, s.server_clip, s.secure_aggregation) == (0.1, 0.0, False)
    p = settings.planning
    assert (p.personalisation, p.normalise, p.round_to, p.min_channels, p.min_fraction) == (0.0, "global", 8, 8, 0.25)
    f = settings.finetune
    assert f.rounds == 0  # opt-in: by default only scores leave a device
    assert (f.steps, f.lr, f.batch_size, f.distill_weight) == (FinetuneConfig.steps, FinetuneConfig.lr,
                                                                FinetuneConfig.batch_size, FinetuneConfig.distill_weight)
    assert settings.evaluation.batch_size == DeliverConfig.batch_size and settings.evaluation.oneshot is True
    assert settings.device.adoption() == Adoption()
    t = settings.timeouts
    assert (t.nodes, t.profile, t.score, t.deliver, t.finetune, t.evaluate) == (120, 300, 600, 600, 900, 600)
    fleet = read_scenario(write(tmp_path, ""))[1].fleet
    assert fleet.tasks == ["seg", "depth", "normals"] and not fleet.classes and not fleet.subsets and not fleet.devices


def test_values_in_the_file_and_the_run_overrides_are_taken(tmp_path):
    path = write(tmp_path, '[scenario]\nname = "lab"\ndevices = 7\nseed = 3\n[model]\nbase = "m"\ntransport = "arrays"\n'
                           "[scoring]\nnum_batches = 5\nclip_norm = 2\nnoise_multiplier = 1.5\n"
                           "[data]\nsamples_per_device = 40\neval_fraction = 0.5\n[timeouts]\nscore = 9.5\n")
    settings = load_settings(path)
    assert (settings.name, settings.devices, settings.seed, settings.transport) == ("lab", 7, 3, "arrays")
    assert settings.base_model_dir == Path("m") and settings.timeouts.score == 9.5
    assert settings.scoring.num_batches == 5 and settings.scoring.clip_norm == 2.0  # an int is fine for a float
    assert isinstance(settings.scoring.clip_norm, float)
    assert (settings.data.samples_per_device, settings.data.eval_fraction) == (40, 0.5)
    over = load_settings(path, devices=3, out_dir=tmp_path / "o", base_model_dir=tmp_path / "b")
    assert (over.devices, over.out_dir, over.base_model_dir) == (3, tmp_path / "o", tmp_path / "b")
    with pytest.raises(ValueError, match="devices must be >= 1, got 0"):
        load_settings(path, devices=0)


# ---------------------------------------------------------------------------------- what is refused


@pytest.mark.parametrize("section", [s for s in SECTIONS if s != "fleet"] + ["fleet"])
def test_an_unknown_key_is_named_with_file_and_section(tmp_path, section):
    path = write(tmp_path, f"[{section}]\ncriterium = 1\n")
    assert error_of(path) == f"scenario {path}: [{section}] criterium: unknown key"


def test_unknown_sections_and_nested_keys_are_named(tmp_path):
    path = write(tmp_path, "[scorings]\nclip_norm = 1.0\n")
    assert error_of(path) == f"scenario {path}: [scorings]: unknown key"
    path = write(tmp_path, '[[fleet.classes]]\nname = "a"\nbudget = 0.5\nbugdet_kind = "params"\n')
    assert error_of(path) == f"scenario {path}: [fleet] classes.0.bugdet_kind: unknown key"


@pytest.mark.parametrize(("text", "where", "fragment"), [
    ('[scenario]\ndevices = "20"', "[scenario] devices", "valid integer"),
    ("[scenario]\ndevices = 2.0", "[scenario] devices", "valid integer"),
    ("[scenario]\nseed = true", "[scenario] seed", "valid integer"),
    ("[model]\nbase = 3", "[model] base", "valid string"),
    ('[scoring]\nsecure_aggregation = "yes"', "[scoring] secure_aggregation", "valid boolean"),
    ('[scoring]\nclip_norm = "1"', "[scoring] clip_norm", "valid number"),
    ("[data]\ndataset_kwargs = 3", "[data] dataset_kwargs", "valid dictionary"),
    ('[fleet]\ntasks = "seg"', "[fleet] tasks", "valid list"),
    ("[finetune]\nrounds = 1.5", "[finetune] rounds", "valid integer"),
])
def test_a_wrong_type_is_refused_not_converted(tmp_path, text, where, fragment):
    path = write(tmp_path, text + "\n")
    message = error_of(path)
    assert message.startswith(f"scenario {path}: {where}: ") and fragment in message, message


@pytest.mark.parametrize(("text", "where", "fragment"), [
    ("[scenario]\ndevices = 0", "[scenario] devices", "greater than or equal to 1"),
    ("[scenario]\nmax_in_flight = 0", "[scenario] max_in_flight", "greater than or equal to 1"),
    ('[model]\ntransport = "ftp"', "[model] transport", "'path' or 'arrays'"),
    ("[data]\neval_fraction = 1.0", "[data] eval_fraction", "less than 1"),
    ("[data]\nalpha = 0", "[data] alpha", "greater than 0"),
    ("[data]\nsamples_per_device = 1", "[data] samples_per_device", "greater than or equal to 2"),
    ('[data]\npartition = "zipf"', "[data] partition", "'iid' or 'dirichlet'"),
    ("[scoring]\nnum_batches = 0", "[scoring] num_batches", "greater than or equal to 1"),
    ("[scoring]\ntrim_fraction = 0.5", "[scoring] trim_fraction", "less than 0.5"),
    ("[scoring]\nclip_norm = -1", "[scoring] clip_norm", "greater than or equal to 0"),
    ("[scoring]\ndp_delta = 1", "[scoring] dp_delta", "less than 1"),
    ('[scoring]\naggregation = "mode"', "[scoring] aggregation", "'weighted-mean', 'median' or 'trimmed-mean'"),
    ('[scoring]\ndtype = "float64"', "[scoring] dtype", "'float16' or 'float32'"),
    ("[planning]\npersonalisation = 1.5", "[planning] personalisation", "less than or equal to 1"),
    ("[finetune]\nrounds = -1", "[finetune] rounds", "greater than or equal to 0"),
    ("[finetune]\nlr = 0", "[finetune] lr", "greater than 0"),
    ("[timeouts]\nscore = 0", "[timeouts] score", "greater than 0"),
    ("[device]\nbn_batches = 0", "[device] bn_batches", "greater than or equal to 1"),
    ('[[fleet.classes]]\nname = "a"\nbudget = 1.5', "[fleet] classes.0.budget", "less than or equal to 1"),
    ("[[fleet.subsets]]\ntasks = []", "[fleet] subsets.0.tasks", "at least 1 item"),
])
def test_an_out_of_range_value_is_refused(tmp_path, text, where, fragment):
    path = write(tmp_path, text + "\n")
    message = error_of(path)
    assert message.startswith(f"scenario {path}: {where}: ") and fragment in message, message


def test_every_problem_is_listed_in_the_one_line(tmp_path):
    path = write(tmp_path, "[scenario]\ndevices = 0\n[scoring]\ncriterium = 1\nnum_batches = 0\n")
    message = error_of(path)
    assert message.count("; ") == 2
    for part in ("[scenario] devices: ", "[scoring] criterium: unknown key", "[scoring] num_batches: "):
        assert part in message


def test_not_toml_and_unknown_scenarios(tmp_path):
    path = write(tmp_path, "[scoring\n")
    assert error_of(path).startswith(f"scenario {path}: not valid TOML")
    with pytest.raises(ValueError, match=r"unknown scenario 'no-such': not a file, and not one of .*default"):
        load_settings("no-such")
    assert load_settings("default").name == "default"  # a shipped scenario, by name
    assert load_settings("default").devices >= 20 and load_settings("default", devices=5).devices == 5
    assert load_settings("fleet-1000").devices == 1000


# ---------------------------------------------------------------------------- conflicting settings


@pytest.mark.parametrize(("text", "fragments"), [
    ("[scoring]\nsecure_aggregation = true\naggregation = \"median\"",
     ["[scoring]", "secure_aggregation gives the server only sums", "'median'"]),
    ("[scoring]\nsecure_aggregation = true\naggregation = \"trimmed-mean\"", ["'trimmed-mean'"]),
    ("[scoring]\nsecure_aggregation = true\nserver_clip = 2.0", ["server_clip 2"]),
    ("[scoring]\nsecure_aggregation = true\n[planning]\npersonalisation = 0.5",
     ["secure_aggregation needs planning.personalisation 0"]),
    ("[scoring]\nsecure_aggregation = true\n[finetune]\nrounds = 1", ["finetune.rounds > 0 uploads"]),
    ("[scoring]\nclip_norm = 1.0\nnoise_multiplier = 1.0\n[finetune]\nrounds = 2", ["finetune.rounds > 0 uploads"]),
    ("[scoring]\nnoise_multiplier = 1.0", ["[scoring]", "noise_multiplier needs clip_norm > 0"]),
])
def test_conflicting_privacy_settings_are_refused(tmp_path, text, fragments):
    message = error_of(write(tmp_path, text + "\n"))
    assert all(f in message for f in fragments), message


def test_secure_aggregation_alone_is_accepted(tmp_path):
    s = load_settings(write(tmp_path, "[scoring]\nsecure_aggregation = true\nclip_norm = 1.0\nnoise_multiplier = 2\n"))
    assert s.scoring.secure_aggregation and s.scoring.noise_multiplier == 2.0


def test_with_scoring_validates_like_the_file(tmp_path):
    settings = load_settings(write(tmp_path, "[finetune]\nrounds = 1\n", name="ft.toml"))
    assert settings.with_scoring(clip_norm=3.0).scoring.clip_norm == 3.0
    assert settings.scoring.clip_norm == 0.0  # a new Settings, this one unchanged
    with pytest.raises(ValueError, match=r"scenario 'ft': \[scoring\] trim_fraction: .*less than 0.5"):
        settings.with_scoring(trim_fraction=0.7)
    with pytest.raises(ValueError, match="finetune.rounds > 0 uploads weights"):
        settings.with_scoring(clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="finetune.rounds > 0 uploads weights"):
        settings.with_scoring(secure_aggregation=True)
    with pytest.raises(ValueError, match=r"\[scoring\] bogus: unknown key"):
        settings.with_scoring(bogus=1)


def test_run_config(tmp_path):
    path = write(tmp_path, "[scenario]\ndevices = 4\n")
    s = S.from_run_config({"scenario": str(path), "devices": 2, "out-dir": str(tmp_path / "o"), "resume": True})
    assert (s.devices, s.out_dir, s.resume) == (2, tmp_path / "o", True)
    assert S.from_run_config({"scenario": str(path), "devices": 0}).devices == 4  # 0 = the scenario's
    with pytest.raises(ValueError, match="run config devices: expected an integer"):
        S.from_run_config({"scenario": str(path), "devices": "many"})
    with pytest.raises(ValueError, match="run config resume: expected true or false"):
        S.from_run_config({"scenario": str(path), "resume": "yes"})


def test_data_follows_the_base_model_card_with_the_scenario_seed():
    card = {"dataset": "scenes", "dataset_kwargs": {"size": 32, "seed": 0, "num_samples": 4000}}
    data = S.data_for_model(DataSpec(seed=5), card)
    assert data.dataset == "scenes" and data.dataset_kwargs == {"size": 32, "seed": 5}  # not the pre-training data
    assert S.data_for_model(data, card) == data  # resolving twice changes nothing
    other = S.data_for_model(DataSpec(dataset="multifashion", dataset_kwargs={"x": 1}), card)
    assert other.dataset_kwargs == {"x": 1}  # another dataset: the card's kwargs do not apply
    with pytest.raises(ValueError, match=r"\[data\] dataset is not set"):
        S.data_for_model(DataSpec(), {})


# ------------------------------------------------------------------------------------------- schema


def test_print_schema_is_json_listing_every_section(capsys):
    from cutfl.cli import main

    assert main(["simulate", "--print-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == json.loads(json.dumps(scenario_schema()))
    assert set(schema["properties"]) == set(SECTIONS)
    assert schema.get("additionalProperties") is False  # unknown sections are refused, and the schema says so
    defs = schema["$defs"]
    for section in SECTIONS:
        ref = schema["properties"][section]["$ref"].rsplit("/", 1)[-1]
        declared = set(ScenarioFile.model_fields[section].annotation.model_fields)
        assert set(defs[ref]["properties"]) == declared, section
        assert defs[ref].get("additionalProperties") is False, section
    scoring = defs[schema["properties"]["scoring"]["$ref"].rsplit("/", 1)[-1]]["properties"]
    assert scoring["trim_fraction"]["default"] == 0.1 and scoring["trim_fraction"]["exclusiveMaximum"] == 0.5
    assert "description" in scoring["clip_norm"]


def test_a_fleet_class_may_declare_a_latency_or_memory_budget(tmp_path):
    """Classes of latency devices (each measures its own table) and memory devices, beside params ones."""
    from simulations.fleet import assign
    from simulations.scenario import load_scenario

    text = ('[[fleet.classes]]\nname = "phone"\nbudget = 0.5\nbudget_kind = "latency"\n'
            '[[fleet.classes]]\nname = "board"\nbudget = 0.4\nbudget_kind = "memory"\n')
    scenario = load_scenario(str(write(tmp_path, text)), out_dir=tmp_path / "out", devices=8)
    kinds = {assign(scenario.fleet, pid, 8).budget.kind for pid in range(8)}
    assert kinds == {"latency", "memory"}
    with pytest.raises(Exception, match="budget_kind"):
        read_scenario(write(tmp_path, '[[fleet.classes]]\nname = "x"\nbudget = 0.5\nbudget_kind = "ms"\n'))
