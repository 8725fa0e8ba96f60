"""Settings come from one typed model (appliance.config, pydantic-settings): defaults < the home's
config.yaml < APPLIANCE_* variables < what a command was given, each refused with the place to fix it."""

import pytest
from click.testing import CliRunner

from appliance.cli import cli
from appliance.config import ClientSettings, default_socket, load_settings
from appliance.errors import ConfigError, ExitCode


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in (
        "APPLIANCE_HOME",
        "APPLIANCE_SLOTS",
        "APPLIANCE_TOP_K",
        "APPLIANCE_SOCKET",
        "XDG_RUNTIME_DIR",
        "APPLIANCE_REFERENCE_COLLECTIONS",
        "APPLIANCE_SERVICE_USER",
    ):
        monkeypatch.delenv(name, raising=False)


def test_yaml_then_environment_then_what_a_command_gives(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text("slots: 5\ntop_k: 9\nreference_collections: [lcats, rates]\n")
    settings = load_settings(home=tmp_path)
    assert (settings.slots, settings.top_k, settings.reference_collections) == (5, 9, ["lcats", "rates"])
    monkeypatch.setenv("APPLIANCE_SLOTS", "7")
    monkeypatch.setenv("APPLIANCE_REFERENCE_COLLECTIONS", "reference, pricing")
    settings = load_settings(home=tmp_path)
    assert (settings.slots, settings.top_k, settings.reference_collections) == (
        7,
        9,
        ["reference", "pricing"],
    )
    assert load_settings(home=tmp_path, slots=2, queue=None).slots == 2  # None: the flag was not given
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path))  # the home itself from the environment
    assert load_settings().home == tmp_path and load_settings().top_k == 9


def test_a_wrong_setting_says_where_to_fix_it(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text("top_k: 9\nslot: 5\n")
    with pytest.raises(ConfigError) as unknown:
        load_settings(home=tmp_path)
    assert (
        "slot" in unknown.value.message and f"remove it from {tmp_path / 'config.yaml'}" in unknown.value.fix
    )
    (tmp_path / "config.yaml").write_text("top_k: many\n")
    with pytest.raises(ConfigError) as bad:
        load_settings(home=tmp_path)
    assert "top_k" in bad.value.message and "APPLIANCE_TOP_K" in bad.value.fix
    (tmp_path / "config.yaml").write_text("top_k: [unclosed\n")
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "status"])
    assert result.exit_code == ExitCode.CONFIG and "not valid YAML" in result.output


def test_the_socket_is_one_setting_for_the_service_and_its_clients(tmp_path, monkeypatch):
    """`appliance serve` listens where clients look: the setting when set, else the same default."""
    assert (
        load_settings(home=tmp_path).socket_path
        == default_socket(tmp_path)
        == tmp_path / "run" / "appliance.sock"
    )
    assert ClientSettings(home=tmp_path).socket_candidates()[0] == default_socket(tmp_path)
    monkeypatch.setenv("APPLIANCE_SOCKET", str(tmp_path / "api.sock"))
    assert load_settings(home=tmp_path).socket_path == tmp_path / "api.sock"
    assert ClientSettings().socket_candidates() == [tmp_path / "api.sock"]
    assert load_settings(home=tmp_path, socket=tmp_path / "flag.sock").socket_path == tmp_path / "flag.sock"


def test_a_client_reads_only_the_environment(tmp_path, monkeypatch):
    """A client may not read the service's home (mode 0700): nothing it needs is only in config.yaml."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text("socket: /elsewhere/api.sock\nservice_user: nobody\n")
    home.chmod(0)
    try:
        monkeypatch.setenv("APPLIANCE_HOME", str(home))
        client = ClientSettings()
        assert client.socket is None and client.service_user == "appliance"
        monkeypatch.setenv("APPLIANCE_SERVICE_USER", "svc")
        assert ClientSettings().service_user == "svc"
    finally:
        home.chmod(0o700)


def test_a_home_given_with_a_tilde_is_expanded(monkeypatch, tmp_path):
    """systemd's EnvironmentFile= and a container's ENV pass `~` through unexpanded: the service and its
    clients must still agree on the home (the CLI compares them to decide whether to use the service)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("APPLIANCE_HOME", "~/apphome")
    assert load_settings().home == ClientSettings().home == tmp_path / "apphome"


@pytest.mark.parametrize("key", ["home", "socket", "service_user"])
def test_what_clients_need_is_refused_in_the_services_config_file(tmp_path, key):
    """The home, the socket and the service's user are read from the environment by clients, which may
    not read the service's home: set in config.yaml they would split the service from its clients."""
    (tmp_path / "config.yaml").write_text(f"{key}: /elsewhere\n")
    with pytest.raises(ConfigError) as refused:
        load_settings(home=tmp_path)
    assert f"'{key}' cannot be set here" in refused.value.message
    assert f"APPLIANCE_{key.upper()}" in refused.value.fix
