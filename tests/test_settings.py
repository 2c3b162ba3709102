"""Settings: the layers, errors that name the setting and its origin, the CLI flags built
from the fields. Fast: no broker, no subprocess."""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

import msgspec
import pytest

from services.cli import COMMAND_SETTINGS, FLAG_ALIASES, _overrides, build_parser
from services.ledger.keep import RULES
from services.settings import KeepRuleName, Settings, SettingsError
from services.settings_loader import SETTING_FIELDS, load_settings, validate_settings


@pytest.fixture
def no_file(tmp_path: Path) -> Path:
    return tmp_path / "absent.toml"


def test_layers_defaults_file_env_flags(tmp_path: Path) -> None:
    config = tmp_path / "nightshift.toml"
    config.write_text(
        'slots = 3\nbackend = "sim"\ncampaign = "file"\nmetric = "file"\nrun_timeout_s = 5\n'
    )
    env = {"NIGHTSHIFT_SLOTS": "5", "NIGHTSHIFT_CAMPAIGN": "env", "NIGHTSHIFT_HTTP_PORT": ""}
    s = load_settings({"campaign": "flag", "metric": None}, env=env, config_file=config)
    assert s.profile == "cpu"  # default
    assert s.backend == "sim" and s.metric == "file"  # file
    assert s.run_timeout_s == 5.0 and isinstance(s.run_timeout_s, float)
    assert s.slots == 5  # env beats file
    assert s.http_port == 8780  # an empty env value is unset
    assert s.campaign == "flag"  # a flag beats env and file; None is no flag


def test_settings_precedence_file_env_flags(tmp_path: Path) -> None:
    config = tmp_path / "nightshift.toml"
    config.write_text('slots = 3\nbackend = "sim"\ncampaign = "from-file"\n')
    env = {"NIGHTSHIFT_SLOTS": "5", "NATS_URL": "nats://x:4222"}
    s = load_settings({"campaign": "from-flag"}, env=env, config_file=config)
    assert (s.slots, s.backend, s.campaign, s.nats_url) == (5, "sim", "from-flag", "nats://x:4222")


def test_bad_settings_name_the_setting(tmp_path: Path, no_file: Path) -> None:
    with pytest.raises(SettingsError, match="NIGHTSHIFT_SLOTS"):
        load_settings(env={"NIGHTSHIFT_SLOTS": "many"}, config_file=no_file)
    with pytest.raises(SettingsError, match="backend"):
        load_settings({"backend": "cloud"}, env={}, config_file=no_file)
    bad = tmp_path / "bad.toml"
    bad.write_text("slotz = 1\n")
    with pytest.raises(SettingsError, match="slotz"):
        load_settings(env={}, config_file=bad)


def test_config_file_named_by_env(tmp_path: Path) -> None:
    config = tmp_path / "other.toml"
    config.write_text('campaign = "named"\n')
    s = load_settings(env={"NIGHTSHIFT_CONFIG": str(config)})
    assert s.campaign == "named"
    with pytest.raises(SettingsError, match="NIGHTSHIFT_CONFIG"):
        load_settings(env={"NIGHTSHIFT_CONFIG": str(tmp_path / "missing.toml")})


def test_env_values_are_parsed_to_the_field_type(no_file: Path) -> None:
    env = {
        "NIGHTSHIFT_SIM_NOISE": "7e-4",
        "NIGHTSHIFT_HTTP_PORT": "0",
        "NIGHTSHIFT_LOG_LEVEL": "debug",
        "NIGHTSHIFT_NATS_TOKEN": "s3cret",
    }
    s = load_settings(env=env, config_file=no_file)
    assert (s.sim_noise, s.http_port, s.log_level, s.nats_token) == (7e-4, 0, "debug", "s3cret")


def test_nats_url_read_and_nightshift_name_wins(no_file: Path) -> None:
    assert (
        load_settings(env={"NATS_URL": "nats://x:4222"}, config_file=no_file).nats_url
        == "nats://x:4222"
    )
    both = {"NATS_URL": "nats://x:4222", "NIGHTSHIFT_NATS_URL": "nats://y:4222"}
    assert load_settings(env=both, config_file=no_file).nats_url == "nats://y:4222"


def test_wrong_env_type_names_the_variable(no_file: Path) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(env={"NIGHTSHIFT_SLOTS": "many"}, config_file=no_file)
    assert str(err.value) == "setting 'slots' from $NIGHTSHIFT_SLOTS: Expected int, got str"


def test_wrong_toml_type_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "nightshift.toml"
    config.write_text('max_experiments = "lots"\n')
    with pytest.raises(SettingsError, match=r"'max_experiments' from .*nightshift\.toml"):
        load_settings(env={}, config_file=config)


def test_unknown_toml_key_names_key_and_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("slotz = 1\n")
    with pytest.raises(SettingsError, match=r"'slotz' in .*bad\.toml"):
        load_settings(env={}, config_file=bad)


def test_backend_that_does_not_exist_is_refused_at_load(tmp_path: Path) -> None:
    config = tmp_path / "nightshift.toml"
    config.write_text('backend = "cloud"\n')
    with pytest.raises(SettingsError) as err:
        load_settings(env={}, config_file=config)
    message = str(err.value)
    assert "'backend'" in message and str(config) in message
    assert "'local', 'sim', 'skypilot'" in message and "cloud" in message


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("slots", 0),
        ("max_experiments", -1),
        ("run_timeout_s", 0),
        ("http_port", 65536),
        ("http_port", -1),
        ("direction", "sideways"),
        ("strategy", "random"),
        ("keep_rule", "lax"),
        ("log_format", "xml"),
        ("log_level", "verbose"),
    ],
)
def test_out_of_range_flag_names_setting(no_file: Path, name: str, raw: object) -> None:
    with pytest.raises(SettingsError, match=f"setting '{name}' from the command line"):
        load_settings({name: raw}, env={}, config_file=no_file)


def test_unknown_override_is_refused(no_file: Path) -> None:
    with pytest.raises(SettingsError, match="slotz"):
        load_settings({"slotz": 2}, env={}, config_file=no_file)


def test_keep_rule_choices_are_the_rules_that_exist() -> None:
    assert set(typing.get_args(KeepRuleName)) == set(RULES)


def test_every_field_has_a_description_and_a_valid_default() -> None:
    for field in SETTING_FIELDS.values():
        assert field.description, field.name
    validate_settings(Settings())
    with pytest.raises(SettingsError, match="'backend' from the settings object"):
        validate_settings(msgspec.structs.replace(Settings(), backend="cloud"))


def test_secrets_are_never_printed() -> None:
    secrets = {"nats_password": "hunter2", "nats_token": "tok123", "nats_user": "alice"}
    s = Settings(nats_url="nats://alice:hunter2@h:4222", **secrets)
    for text in (repr(s), str(s), str(s.redacted())):
        assert "hunter2" not in text and "tok123" not in text
    assert s.redacted()["nats_user"] == "alice"
    assert s.nats_password == "hunter2"  # the value itself is untouched


def _subparser(parser: argparse.ArgumentParser, path: str) -> argparse.ArgumentParser:
    for word in path.split():
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


def test_every_command_setting_is_a_field_with_a_flag() -> None:
    parser = build_parser()
    for name in FLAG_ALIASES:
        assert name in SETTING_FIELDS
    for command, names in COMMAND_SETTINGS.items():
        dests = {a.dest for a in _subparser(parser, command)._actions}
        for name in names:
            assert name in SETTING_FIELDS, (command, name)
            assert name in dests, (command, name)


def test_flag_choices_are_the_literal_choices() -> None:
    up = _subparser(build_parser(), "up")
    by_dest = {a.dest: a for a in up._actions}
    for name in ("backend", "direction", "strategy"):
        assert tuple(by_dest[name].choices or ()) == SETTING_FIELDS[name].choices
    assert tuple(by_dest["backend"].choices or ()) == ("local", "sim", "skypilot")


def test_unknown_backend_flag_exits_2() -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["up", "--backend", "cloud"])
    assert exit_.value.code == 2


def test_skypilot_tiers_from_toml_and_from_env_json(tmp_path: Path) -> None:
    config = tmp_path / "nightshift.toml"
    config.write_text(
        'backend = "skypilot"\ntier = "screen"\n'
        '[[skypilot_tiers]]\nname = "screen"\naccelerator = "H100:1"\nclusters = 13\n'
        'infra = "k8s/lab"\nusd_per_gpu_hour = 2.5\n'
        '[[skypilot_tiers]]\nname = "validate"\naccelerator = "H200:1"\nclusters = 3\n'
    )
    s = load_settings(env={}, config_file=config)
    assert [(t.name, t.accelerator, t.clusters) for t in s.skypilot_tiers] == [
        ("screen", "H100:1", 13),
        ("validate", "H200:1", 3),
    ]
    assert s.skypilot_tiers[0].infra == "k8s/lab" and s.skypilot_tiers[1].autostop_minutes == 10
    validate_settings(s)
    # The environment replaces the file's list with its JSON one.
    env = {"NIGHTSHIFT_SKYPILOT_TIERS": '[{"name": "big", "accelerator": "H200:8", "spot": true}]'}
    s = load_settings(env=env, config_file=config)
    assert [(t.name, t.accelerator, t.spot) for t in s.skypilot_tiers] == [("big", "H200:8", True)]
    for bad, why in (
        ('[{"name": "Big"}]', "at \\$\\[0\\].name"),
        ('[{"name": "b", "clusters": 0}]', "at \\$\\[0\\].clusters"),
        ('[{"name": "b", "gpus": 1}]', "unknown field"),
        ("[{", "NIGHTSHIFT_SKYPILOT_TIERS"),
    ):
        with pytest.raises(SettingsError, match=why):
            load_settings(env={"NIGHTSHIFT_SKYPILOT_TIERS": bad}, config_file=config)


def test_old_flag_spellings_still_parse(no_file: Path) -> None:
    args = build_parser().parse_args(
        [
            "up",
            "--name",
            "c1",
            "--trainer",
            "t",
            "--edit-file",
            "m.py",
            "--metric",
            "acc",
            "--direction",
            "maximize",
            "--profile",
            "gpu",
            "--strategy",
            "grid",
            "--max-experiments",
            "7",
            "--run-timeout",
            "9.5",
            "--backend",
            "sim",
            "--slots",
            "3",
            "--http-port",
            "0",
            "--home",
            "h",
        ]
    )
    s = load_settings(_overrides(args), env={"NIGHTSHIFT_SLOTS": "8"}, config_file=no_file)
    assert (s.campaign, s.trainer_dir, s.edit_file, s.metric, s.direction, s.profile) == (
        "c1",
        "t",
        "m.py",
        "acc",
        "maximize",
        "gpu",
    )
    assert (s.strategy, s.max_experiments, s.run_timeout_s, s.backend, s.slots) == (
        "grid",
        7,
        9.5,
        "sim",
        3,
    )
    assert (s.http_port, s.home) == (0, "h")
    start = build_parser().parse_args(["campaign", "start", "--campaign", "c2"])
    assert _overrides(start) == {"campaign": "c2"}
    status = build_parser().parse_args(["status", "--campaign", "c3", "--home", "x"])
    assert _overrides(status) == {"campaign": "c3", "home": "x"}


def test_bench_fleet_keeps_its_own_flags() -> None:
    args = build_parser().parse_args(["bench", "fleet", "--slots", "4", "--json"])
    assert (args.slots, args.experiments, args.run_seconds, args.in_process, args.json) == (
        4,
        0,
        0.0,
        False,
        True,
    )
    assert _overrides(args) == {}
    stop = build_parser().parse_args(["campaign", "stop", "c"])
    assert stop.name == "c" and _overrides(stop) == {}


def test_log_level_in_any_case(no_file: Path) -> None:
    """`NIGHTSHIFT_LOG_LEVEL=INFO` worked before the settings were typed; it still does."""
    assert (
        load_settings(env={"NIGHTSHIFT_LOG_LEVEL": "WARNING"}, config_file=no_file).log_level
        == "warning"
    )
