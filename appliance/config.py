"""Settings (pydantic-settings): defaults < `$APPLIANCE_HOME/config.yaml` < `APPLIANCE_*` environment
variables < what a command was given (`appliance serve --slots 8`).

The same variables work in systemd's `EnvironmentFile=`. Unknown keys in the YAML file are refused.
`ClientSettings` are the few a client needs (the home, the service's socket and user): read from the
environment alone, since a client may not read the service's home.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from appliance.bundles.manifest import DEFAULT_N_CTX
from appliance.errors import ConfigError


def default_home() -> Path:
    env = os.environ.get("APPLIANCE_HOME")
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "appliance"


SYSTEM_SOCKET = Path(
    "/run/appliance/api.sock"
)  # the systemd unit's and the container's (they set APPLIANCE_SOCKET)


def default_socket(home: Path | None = None) -> Path:
    """Where `appliance serve` listens when no socket is set, and where the CLI looks first: the user's
    runtime directory, else `run/` under the home - never a directory others can write, such as /tmp,
    where another user could plant a socket first."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return (
        Path(runtime) / "appliance.sock" if runtime else (home or default_home()) / "run" / "appliance.sock"
    )


def trusted_uids() -> set[int]:
    """Whose socket a client may talk to: the caller, root and the service's user (the setting
    `service_user`, APPLIANCE_SERVICE_USER; a name or a number)."""
    import pwd

    name = ClientSettings().service_user
    uids = {os.getuid(), 0}
    if name.isdigit():
        uids.add(int(name))
    else:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            pass
    return uids


def untrusted_socket(path: Path) -> str | None:
    """Why a client must not talk to (or a service listen on) this socket, or None when it may. A link is
    followed and judged by where it leads: the directory of the link and that of the socket it names must
    each be writable by their owner alone, and both directories and the socket must belong to the caller,
    root or the service's user (a directory merely owned by whoever made the socket proves nothing)."""
    import stat

    trusted = trusted_uids()
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as exc:  # a link loop
        return f"{path}: cannot be resolved ({exc})"
    for where in dict.fromkeys((path.parent, real.parent)):
        try:
            info = where.stat()
        except OSError as exc:
            return f"{where}: cannot stat ({exc.strerror})"
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return (
                f"{where} is writable by other users (mode {stat.filemode(info.st_mode)}), so anyone "
                "could have put a socket there"
            )
        if info.st_uid not in trusted:
            return (
                f"{where} belongs to uid {info.st_uid}, not to you, root or the service's user, so its "
                "owner could have put a socket there"
            )
    try:
        owner = real.lstat().st_uid
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{real}: cannot stat ({exc.strerror})"
    if owner not in trusted:
        return f"{real} belongs to uid {owner}, not to you, root or the service's user"
    return None


class ClientSettings(BaseSettings):
    """What the CLI and the UI need to find the service, from the environment alone."""

    model_config = SettingsConfigDict(env_prefix="APPLIANCE_", extra="ignore")

    home: Path = Field(
        default_factory=default_home, description="Where generations and the database live (APPLIANCE_HOME)"
    )
    socket: Path | None = Field(
        default=None,
        description="The service's Unix socket: where `appliance serve` "
        "listens and the CLI and UI look for it (default: $XDG_RUNTIME_DIR/appliance.sock, "
        "else run/appliance.sock under the home; the systemd unit and the container set "
        "/run/appliance/api.sock). Set it as APPLIANCE_SOCKET, not only in config.yaml: clients "
        "read the environment, never the service's home",
    )
    service_user: str = Field(
        default="appliance",
        description="The user the service runs as (a name or a number): "
        "a socket it owns is trusted by clients, besides their own and root's",
    )

    @property
    def socket_path(self) -> Path:
        """The socket `appliance serve` listens on."""
        return self.socket or default_socket(self.home)

    def socket_candidates(self) -> list[Path]:
        """Where a client looks for the service, in order: the socket set, else the defaults."""
        return [self.socket] if self.socket else [default_socket(self.home), SYSTEM_SOCKET]

    @field_validator("home", "socket")
    @classmethod
    def _expanded(cls, value):  # systemd's EnvironmentFile= and a container's ENV never expand ~
        return Path(value).expanduser() if value is not None else None


class _HomeConfig(PydanticBaseSettingsSource):
    """`config.yaml` in the home (the home as given, else from the environment or its default)."""

    def __init__(self, settings_cls, home: Path):
        super().__init__(settings_cls)
        self.path = home / "config.yaml"

    def get_field_value(self, field, field_name):  # the whole file is read in __call__
        return None, field_name, False

    def __call__(self) -> dict:
        if not self.path.exists():
            return {}
        try:
            loaded = yaml.safe_load(self.path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{self.path}: not valid YAML ({exc})", "fix the file or remove it") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{self.path}: expected a mapping of settings", "see `appliance --help`")
        for name in (
            ClientSettings.model_fields
        ):  # where to find the home and the service: clients never read this file
            if name in loaded:
                raise ConfigError(
                    f"{self.path}: '{name}' cannot be set here (the CLI and the UI never read the service's home)",
                    f"set APPLIANCE_{name.upper()} in the environment (for systemd: /etc/appliance/appliance.env)",
                )
        return loaded


class Settings(ClientSettings):
    model_config = SettingsConfigDict(env_prefix="APPLIANCE_", extra="forbid")

    threads: int = Field(default=0, ge=0, description="llama.cpp threads; 0 = all cores")
    embed_threads: int = Field(default=0, ge=0, description="onnxruntime intra-op threads; 0 = all cores")
    embed_batch: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="Chunks per ONNX call (small batches stay in cache: fastest on CPU)",
    )
    n_ctx: int = Field(
        default=DEFAULT_N_CTX,
        ge=256,
        le=131072,
        description="Context window given to llama.cpp (at most the model's): room for a "
        "follow-up to keep the earlier turn's sources",
    )
    max_tokens: int = Field(default=256, ge=1, le=8192, description="Default cap on generated tokens")
    temperature: float = Field(default=0.2, ge=0.0, le=2.0, description="Default sampling temperature")
    top_k: int = Field(default=5, ge=1, le=50, description="Sources retrieved for an answer")
    follow_up_k: int = Field(
        default=3,
        ge=0,
        le=50,
        description="New sources added for a follow-up question "
        "(the earlier turns' sources stay in its prompt, still numbered)",
    )
    shown_sentences: int = Field(
        default=3,
        ge=0,
        le=50,
        description="Show the model only this many of the retrieved chunks' sentences, those closest "
        "to the question (0: whole chunks); on held-out documents the demo model found 9 of 18 facts "
        "shown 3 sentences, 3 of 18 shown whole chunks (bench/reading.py)",
    )
    abstain_below: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="When no sentence of the retrieved chunks scores this close to the question "
        "(embedder cosine), answer that the documents do not cover it without asking the model "
        "(0: never; see bench/reading.py for how it is calibrated)",
    )
    abstain_unknown_names: bool = Field(
        default=True,
        description="When a question names something no document holds (a capitalized word, an "
        "acronym, a number of three or more digits: 'our NASA contract'), say the documents do not "
        "cover it, naming the term, without asking the model",
    )
    mmap: bool = Field(
        default=False,
        description="Memory-map the model instead of reading it in (more resident "
        "memory where llama.cpp repacks weights)",
    )
    max_file_mb: float = Field(default=25.0, gt=0, description="Files larger than this are refused at ingest")
    chunk_chars: int = Field(default=1200, ge=200, le=20000, description="Target chunk size in characters")
    security_floor: int = Field(
        default=0,
        ge=0,
        description="Never install a bundle version below this, not even with --allow-downgrade",
    )
    admin_group: str = Field(
        default="appliance-admin",
        description="Members of this group (name or number) may install and roll back bundles, "
        "export feedback, read everyone's audit rows and remove anyone's "
        "documents over the socket; the service's user and root always may",
    )
    parse_memory_mb: int = Field(
        default=1536,
        ge=256,
        le=65536,
        description="Address space of the child process that parses PDF, DOCX, XLSX "
        "and CSV files (a file needing more is refused)",
    )
    parse_timeout_s: float = Field(
        default=120.0, gt=0, le=3600, description="Longest one file may take to parse"
    )
    engine: Literal["auto", "server", "inprocess"] = Field(
        default="auto",
        description="What generates for `appliance serve`: llama.cpp's server on `slots` slots "
        "(continuous batching), or the service's own process; auto: the server when "
        "its binary is there",
    )
    slots: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Answers the engine server decodes together (each gets n_ctx tokens of KV cache)",
    )
    engine_binary: str | None = Field(
        default=None, description="Path of llama-server (default: beside the appliance's Python, then PATH)"
    )
    queue: int = Field(
        default=4,
        ge=0,
        le=256,
        description="Requests that may wait for the service's worker; the next one gets 503 with Retry-After",
    )
    tcp: str | None = Field(
        default=None,
        description="HOST:PORT to listen on besides the socket (off by default; needs token_file)",
    )
    token_file: Path | None = Field(
        default=None, description="Bearer tokens for TCP: lines 'NAME TOKEN [admin]', mode 0600"
    )
    reference_collections: Annotated[list[str], NoDecode] = Field(
        default=["reference"],
        min_length=1,
        description="The collections whose tables are the reference (codes, titles, qualifications): only their "
        "rows feed lookups, code checks and staffing, and only administrators add to them; a table "
        "elsewhere is searched as text. Comma-separated in APPLIANCE_REFERENCE_COLLECTIONS",
    )
    audit_text: bool = Field(
        default=False,
        description="Keep questions and answers in full in the audit log (hashes only by default)",
    )

    @field_validator("reference_collections", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        home = init_settings.init_kwargs.get("home") or ClientSettings().home
        return init_settings, env_settings, _HomeConfig(settings_cls, Path(home))

    @property
    def db_path(self) -> Path:
        return self.home / "appliance.db"

    @property
    def generations_dir(self) -> Path:
        return self.home / "generations"


def load_settings(**overrides) -> Settings:
    """Defaults < config.yaml < environment < explicit overrides (None: not given)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        home = Path(given.get("home") or ClientSettings().home)
        name = field.split(".")[0]
        where = (
            f"correct it in {home / 'config.yaml'} or in APPLIANCE_{name.upper()}"
            if name in Settings.model_fields
            else f"remove it from {home / 'config.yaml'}; `appliance --help` lists the settings"
        )
        raise ConfigError(f"setting '{field}': {first['msg']}", where) from exc
