"""Effective configuration: defaults < ``DMS_HOME/config.toml`` < ``DMS_*`` variables.

``load_settings()`` is the only way to build :class:`Settings`; it finds the
home folder first (``DMS_HOME`` or ``~/.dms``) because the TOML file lives there.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from dms.errors import DmsError
from dms.resources.preferences import Preferences

MIB = 1024 * 1024


_URL_PASSWORD = re.compile(r"^([\w+.-]+://[^:/@]*:)[^@]*@")  # scheme://user:password@


class ConfigError(DmsError):
    """A configuration file or variable with a bad value."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DMS_", extra="forbid")

    home: Path = Field(default=Path("~/.dms"), description="node folder")
    db_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite file DMS_HOME/dms.db"
    )
    passphrase: SecretStr | None = Field(default=None, description="keystore passphrase")
    api_port: int = Field(default=9999, ge=0, le=65535)
    max_data_bytes: int = Field(default=16 * MIB, ge=1024, description="largest envelope")
    max_control_bytes: int = Field(
        default=1 * MIB, ge=1024, description="largest envelope for a control behaviour"
    )
    malloc_mmap_threshold_bytes: int = Field(
        default=256 * 1024,
        ge=0,
        description="dms run: blocks of at least this many bytes are mapped apart by the C "
        "allocator and given back to the system when freed (a refused 16 MiB frame leaves "
        "no RSS behind); 0: glibc's own threshold, which rises with each large block freed",
    )
    malloc_trim_interval_s: float = Field(
        default=1.0,
        ge=0,
        description="dms run: how often the free pages of the C allocator's heaps are looked "
        "at, and given back to the system once malloc_trim_freed_bytes more were freed (a "
        "flood of many keys' frames leaves no RSS behind); 0: never (glibc gives back only "
        "the top of each heap)",
    )
    malloc_trim_freed_bytes: int = Field(
        default=4 * MIB,
        ge=64 * 1024,
        description="bytes freed into the heaps since the last trim that make the next one",
    )
    max_ttl_s: float = Field(default=3600.0, gt=0, description="longest accepted expiry")
    clock_skew_s: float = Field(default=60.0, ge=0)
    invoke_timeout_s: float = Field(default=10.0, gt=0)
    replay_cache_size: int = Field(
        default=200_000,
        ge=1000,
        description="envelopes remembered against replay; older ones are refused when full",
    )
    max_frames_per_s: float = Field(
        default=2000.0,
        gt=0,
        description="frames a second each peer may send this node on its streams; more are "
        "refused (rate_limited)",
    )
    frame_burst: int = Field(
        default=4000, ge=1, description="frames a peer may send at once above that rate"
    )
    max_unknown_frames_per_s: float = Field(
        default=1000.0,
        gt=0,
        description="frames a second all peers this node has no stake in may send it "
        "together (each within max_frames_per_s); more are refused (rate_limited)",
    )
    unknown_frame_burst: int = Field(
        default=2000, ge=1, description="frames they may send at once above that rate"
    )
    flooder_frames_per_s: float = Field(
        default=20.0,
        gt=0,
        description="frames a second a peer without a stake may send once found flooding "
        "(refused past max_frames_per_s, or past its share of max_unknown_frames_per_s), "
        "for flooder_cooldown_s; more are refused undecoded (rate_limited)",
    )
    flooder_cooldown_s: float = Field(
        default=10.0,
        ge=0,
        description="how long a peer found flooding keeps the rate above, from its last "
        "frame refused; 0: flooders keep the budgets of any peer",
    )
    gossip_messages_per_peer_per_s: float = Field(
        default=50.0,
        gt=0,
        description="gossip messages a second one publishing host may have this node handle, "
        "whoever forwards them; more are dropped (rate_limited)",
    )
    gossip_burst_per_peer: int = Field(
        default=200, ge=1, description="gossip messages one host may publish at once above that"
    )
    gossip_flooder_messages_per_s: float = Field(
        default=2.0,
        gt=0,
        description="gossip messages a second a publishing host without a stake may have "
        "this node handle once found over the budget above, for flooder_cooldown_s; more "
        "are dropped (rate_limited)",
    )
    revocations_per_peer_per_s: float = Field(
        default=2.0,
        gt=0,
        description="revocations a second one publishing host may have this node handle "
        "(gossip on /dms/revocation, besides the budget above); more are dropped "
        "(rate_limited), and this node publishes its own no faster",
    )
    revocation_burst_per_peer: int = Field(
        default=20, ge=1, description="revocations one host may publish at once above that"
    )
    max_outbound_frames: int = Field(
        default=10_000, ge=16, description="most frames queued for one peer; more fail at once"
    )
    max_outbound_bytes: int = Field(
        default=64 * MIB, ge=MIB, description="most bytes queued for one peer; more fail at once"
    )
    # Network budgets (dms.network.budgets; specs/security.md, "Budgets and priority").
    max_inbound_connections: int = Field(
        default=250,
        ge=1,
        description="connections other peers may hold open to this node; when full, the "
        "unknown peer idle the longest is evicted for a newcomer (connection_evicted)",
    )
    max_connections_per_ip: int = Field(
        default=128, ge=1, description="inbound connections from one IP address"
    )
    max_connections_per_subnet: int = Field(
        default=192, ge=1, description="inbound connections from one /24 (IPv6: /64) subnet"
    )
    max_handshakes: int = Field(
        default=64,
        ge=1,
        description="sockets in their Noise/Yamux handshake at once; when full the oldest "
        "is dropped (handshake_evicted)",
    )
    max_handshakes_per_ip: int = Field(
        default=16, ge=1, description="sockets in their handshake at once from one IP"
    )
    handshake_timeout_s: float = Field(
        default=5.0, gt=0, description="close a socket that has not finished its handshake"
    )
    max_streams_per_peer: int = Field(
        default=64, ge=4, description="streams one peer may open at once; more are reset"
    )
    max_streams: int = Field(
        default=4096, ge=16, description="streams all peers may open at once; more are reset"
    )
    stream_idle_s: float = Field(
        default=120.0, gt=0, description="reset an inbound stream with no frame for this long"
    )
    max_protocol_streams_per_peer: int = Field(
        default=8,
        ge=2,
        description="streams of one py-libp2p protocol (identify, ping, the DHT, ...) one "
        "peer may open at once; more are reset",
    )
    protocol_idle_s: float = Field(
        default=30.0,
        gt=0,
        description="reset an inbound stream of py-libp2p's own protocols (identify, ping, the "
        "DHT, ...) with no byte either way for this long (pubsub's excepted)",
    )
    max_buffered_bytes: int = Field(
        default=256 * MIB,
        ge=MIB,
        description="bytes received and not yet read, all streams (each: its receive window); "
        "a peer past either loses the stream (window_exceeded)",
    )
    max_transfers_per_peer: int = Field(
        default=8, ge=1, description="chunk requests of one peer served at once"
    )
    max_transfers: int = Field(default=64, ge=1, description="chunk requests served at once")
    chunk_idle_s: float = Field(
        default=10.0, gt=0, description="end a chunk stream idle this long (transfer_stalled)"
    )
    chunk_min_bytes_per_s: int = Field(
        default=256 * 1024,
        ge=1024,
        description="end a chunk stream slower than this, past chunk_idle_s (transfer_stalled)",
    )
    max_outbound_connections: int = Field(
        default=256,
        ge=1,
        description="connections this node may hold that it dialed; past it a dial for a "
        "peer it has no stake in is refused (outbound_full), one for a peer with a stake "
        "closes the idlest unknown one (outbound_evicted)",
    )
    max_waiting_bytes: int = Field(
        default=256 * MIB,
        ge=MIB,
        description="most bytes of frames waiting for streams to peers being dialed, all "
        "peers together (each peer's own bound is max_outbound_bytes); more fail at once "
        "(waiting_full)",
    )
    max_waiting_peers: int = Field(
        default=1024,
        ge=1,
        description="most peers with frames waiting for a stream at once, each a task and a "
        "dial (a DHT lookup for an unknown key); a frame for one more fails at once, before "
        "its dial starts (waiting_full), unless the node has a stake in it or it is connected",
    )
    max_new_dials_per_s: float = Field(
        default=16.0,
        gt=0,
        description="dials a second of peers this node has no stake in and never reached; "
        "past it (and new_dial_burst at once), while every dial slot is taken (a dial "
        "through a relay in flight counting as one), such a dial is refused (new_dials_full)",
    )
    new_dial_burst: int = Field(
        default=64, ge=1, description="such dials it may start at once above that"
    )
    max_peerstore_peers: int = Field(
        default=1000,
        ge=10,
        description="peers the libp2p peerstore keeps (addresses, key, protocols); past "
        "it those neither connected nor staked go, peers heard lately last, without "
        "addresses first, then the longest unidentified; an unknown peer that leaves "
        "is forgotten at once",
    )
    max_peerstore_heard_peers: int = Field(
        default=500,
        ge=0,
        description="peers heard lately through their heartbeats (known the longest "
        "first) whose peerstore entries go after every fresh key's and stay when they "
        "leave; the rest are as unknown peers",
    )
    max_inbound_bytes_per_peer_per_s: int = Field(
        default=8 * MIB,
        ge=64 * 1024,
        description="bytes a second one peer may send on its actor streams; past it (and "
        "inbound_byte_burst_per_peer at once) its streams are read more slowly "
        "(bytes_throttled)",
    )
    inbound_byte_burst_per_peer: int = Field(
        default=4 * MIB, ge=64 * 1024, description="bytes one peer may send at once above that"
    )
    max_inbound_bytes_per_s: int = Field(
        default=16 * MIB,
        ge=64 * 1024,
        description="bytes a second all peers this node has no stake in may send on actor "
        "streams together; past it (and inbound_byte_burst) theirs are read more slowly",
    )
    inbound_byte_burst: int = Field(
        default=16 * MIB, ge=64 * 1024, description="bytes they may send at once above that"
    )
    max_new_streams_per_peer_per_s: float = Field(
        default=32.0,
        gt=0,
        description="new streams a second one peer may open; past it (and "
        "new_stream_burst_per_peer at once) its connection's next stream is taken later "
        "(streams_throttled)",
    )
    new_stream_burst_per_peer: int = Field(
        default=64, ge=1, description="new streams one peer may open at once above that"
    )
    max_unknown_new_streams_per_s: float = Field(
        default=100.0,
        gt=0,
        description="new streams a second all peers this node has no stake in may open "
        "together; past it (and unknown_new_stream_burst) theirs are taken later",
    )
    unknown_new_stream_burst: int = Field(
        default=200, ge=1, description="new streams they may open at once above that"
    )
    peer_forget_s: float = Field(
        default=3600.0, gt=0, description="drop a peer from the peers table once gone this long"
    )
    peerbook_max_peers: int = Field(
        default=1024,
        ge=16,
        description="peers remembered to dial again at start (dms nodes heard, peers it "
        "dialed, or with a stake here); those without a stake hold at most unknown_share "
        "of it and go first, the longest unseen first",
    )
    store_wait_s: float = Field(
        default=0.5,
        gt=0,
        le=30,
        description="longest the node's own thread waits for its store (another process "
        "holding the database locked, e.g. someone's sqlite3 with a write transaction "
        "open); past it a peer's request is refused store_refused (the store is busy), "
        "the owner's command fails saying so, and timed work (lease expiry) tries again",
    )
    store_start_wait_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="longest dms run waits, all its start-up together, for a store another "
        "process holds locked (saying so every few seconds meanwhile); past it the node "
        "does not start, and says why",
    )
    retention_s: float = Field(
        default=7 * 24 * 3600.0,
        ge=60,
        description="keep rows of bids, events and ended leases this long, then prune them",
    )
    # Global budgets beside the per-peer ones (specs/security.md, "Global budgets").
    max_inflight: int = Field(
        default=512,
        ge=1,
        description="requests of remote peers this node holds (admitted, not yet handled); "
        "more are refused (rate_limited)",
    )
    max_inflight_per_peer: int = Field(
        default=64, ge=1, description="requests of one peer this node holds at once"
    )
    max_pending_decode_bytes: int = Field(
        default=4 * MIB,
        ge=1024,
        description="bytes of admitted requests not yet decoded and validated, of all peers",
    )
    max_pending_decode_bytes_per_peer: int = Field(
        default=1 * MIB,
        ge=1024,
        description="the same, of one peer (one frame of any size is always admitted)",
    )
    unknown_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="share of each global budget that peers this node has no stake in "
        "(no allocation, no anchor) may use together",
    )
    ip_share: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description="share of the unknown peers' part that peers at one IP address may use",
    )
    bid_requests_per_s_total: float = Field(
        default=100.0,
        ge=0,
        description="bid requests a second from all peers together, one per started 4 KiB "
        "(a 256-slot request counts 11; unknown peers: unknown_share of it); 0: no limit",
    )
    bid_request_burst_total: int = Field(
        default=200, ge=1, description="bid requests all peers may send at once above that"
    )
    max_bid_slots: int = Field(
        default=64,
        ge=1,
        le=256,
        description="slots of one bid request this node considers; the rest are declined",
    )
    bid_index_rows: int = Field(
        default=20_000, ge=100, description="rows of bids sent this node keeps in all"
    )
    bid_index_bytes: int = Field(
        default=4 * MIB, ge=64 * 1024, description="bytes of bids sent this node keeps in all"
    )
    bid_index_rows_per_peer: int = Field(
        default=1_000,
        ge=10,
        description="rows of bids sent to one requester; over it, its requests are refused "
        "(a requester this node has a stake in loses its oldest rows instead)",
    )
    bid_index_bytes_per_peer: int = Field(
        default=256 * 1024, ge=4096, description="bytes of bids sent to one requester"
    )
    bid_index_max_age_s: float = Field(
        default=3600.0, ge=1, description="bids sent older than this are pruned"
    )
    log_level: str = "INFO"
    listen: list[str] = Field(
        default_factory=lambda: ["/ip4/0.0.0.0/tcp/9000"], description="libp2p listen multiaddrs"
    )
    bootstrap: list[str] = Field(
        default_factory=list, description="peers to dial at start (multiaddrs with /p2p/)"
    )
    mdns: bool = Field(default=False, description="find peers on the LAN with mDNS")
    reachability: Literal["auto", "public", "private"] = Field(
        default="auto",
        description="auto: peers dial this node back to tell (AutoNAT); public / private: "
        "say so without asking",
    )
    relay: bool | None = Field(
        default=None,
        description="serve as a circuit relay for nodes behind NAT; unset: when this node "
        "is publicly reachable",
    )
    hole_punching: bool = Field(
        default=True,
        description="upgrade a relayed connection to a direct one through both NATs (DCUtR)",
    )
    relay_reservations: int = Field(
        default=2, ge=0, le=8, description="relays a node behind NAT keeps a slot on"
    )
    relay_max_reservations: int = Field(
        default=64, ge=1, description="slots this relay holds for others, in all"
    )
    relay_max_circuits_per_peer: int = Field(
        default=8, ge=1, description="relayed connections one peer may open at once"
    )
    relay_max_circuits: int = Field(
        default=128, ge=1, description="relayed connections open at once, all peers"
    )
    relay_max_circuit_bytes: int = Field(
        default=256 * MIB, ge=1024, description="bytes one relayed connection may carry"
    )
    relay_max_circuit_s: int = Field(
        default=3600, ge=1, description="seconds one relayed connection may last"
    )
    relay_max_peer_bytes_per_h: int = Field(
        default=1024 * MIB, ge=1024, description="bytes relayed for one peer in an hour"
    )
    relay_max_bytes_per_h: int = Field(
        default=8192 * MIB, ge=1024, description="bytes relayed in an hour, all peers"
    )
    dial_timeout_s: float = Field(default=5.0, gt=0, description="give up dialing a peer after")
    connection_aim: int | None = Field(
        default=None,
        ge=1,
        # NetworkSettings.max_connections, the high watermark: past it an aim was cut to it
        le=300,
        description="connections the node dials the peers it knows until it holds, inbound "
        "ones counted; unset: py-libp2p's aim, 175 (midway between its 50 and 300), at "
        "most 300. Nodes sharing one process's loop (dms sim's threads mode) aim at 12",
    )
    reconnect_interval_s: float = Field(
        default=10.0,
        ge=0.5,
        description="dial the bootstrap and remembered peers again this often while "
        "disconnected from them (a remembered peer whose dial failed: twice as long each "
        "time, up to 10 min)",
    )
    heartbeat_s: float = Field(
        default=2.0, ge=0.1, le=300, description="announce this node on the heartbeat topic every"
    )
    benchmark_step_s: float = Field(
        default=0.4,
        gt=0,
        le=10,
        description="time the capability benchmark gives each of its measurements "
        "(shorter: a quicker, noisier benchmark)",
    )
    heartbeat_budget_per_s: float = Field(
        default=10.0, gt=0, description="most heartbeats a second the whole network sends"
    )
    labels: list[str] = Field(
        default_factory=list, description="labels of this node that jobs may require"
    )
    orphan_s: float = Field(
        default=15.0, gt=0, description="stop an allocation whose requester is gone this long"
    )
    expire_every_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="mark this provider's leases past their expiry this often (bookkeeping "
        "only: an expired lease stops counting at once)",
    )
    ended_allocations_kept: int = Field(
        default=256,
        ge=0,
        le=65536,
        description="the final answers (status, logs) of this many ended allocations are "
        "kept to answer their late polls (the oldest go first); the allocations themselves "
        "stop at their end",
    )
    ended_allocation_keep_s: float = Field(
        default=120.0,
        gt=0,
        le=86400,
        description="an ended allocation's final answers are kept this long after its end",
    )
    chunk_quota: int = Field(
        default=2048 * MIB, ge=0, description="most bytes the chunk store may hold"
    )
    mining_step_floor_s: float = Field(
        default=30.0,
        gt=0,
        description="the shortest deadline of a mining step: a worker that does not answer "
        "within max(this, mining_step_slack x the step's work / its benchmark) is excluded "
        "for the job and its shard placed again",
    )
    mining_step_slack: float = Field(
        default=20.0,
        ge=1,
        description="a mining step's deadline as a multiple of what the worker's benchmark "
        "(ckks_mul_per_s) says the step's work takes",
    )
    mining_max_replacements: int = Field(
        default=8,
        ge=0,
        description="workers a mining job may lose or exclude (stalled, caught cheating, a "
        "bad answer) before it fails with the reason",
    )
    collab_max_seats: int = Field(
        default=32,
        ge=0,
        description="collaborations (dms mine collab) this node takes part in at once",
    )
    collab_owner_timeout_s: float = Field(
        default=20.0,
        gt=0,
        description="a collaboration's deadline for each owner's answer; an owner that "
        "misses it is dropped from that round",
    )
    collab_join_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="how long a proposed collaboration waits for the owners to join",
    )
    preferences: Preferences = Field(
        default_factory=Preferences, description="the work this node accepts"
    )
    max_revocations: int = Field(
        default=10_000,
        ge=10,
        description="revocations this node stores in all; more are refused, none stored is "
        "dropped (this node's, its roots' and its authorities' are stored past it)",
    )
    revocations_per_issuer: int = Field(
        default=256, ge=1, description="revocations one revoking key may have stored here"
    )
    revocation_checks_per_s: float = Field(
        default=50.0,
        gt=0,
        description="revocations heard that this node verifies a second, from all peers; "
        "more are dropped (over_budget)",
    )
    revocation_checks_per_peer_per_s: float = Field(
        default=5.0, gt=0, description="revocations heard that it verifies a second from one peer"
    )
    chain_checks_per_s: float = Field(
        default=200.0,
        gt=0,
        description="token chains never seen before that this node verifies a second, from "
        "all peers; more are refused (rate_limited, rule over_budget)",
    )
    chain_checks_per_peer_per_s: float = Field(
        default=20.0, gt=0, description="new token chains it verifies a second from one peer"
    )
    api_max_connections: int = Field(
        default=32,
        ge=1,
        description="local API connections open at once; more are refused (503, busy)",
    )
    api_timeout_s: float = Field(
        default=30.0, gt=0, description="the local API closes a connection idle this long"
    )
    deployment_policy: Literal["open", "tokens"] = Field(
        default="open",
        description="who may ask this node for bids (/dms/deployment/*): any peer (open), "
        "or only peers holding a token from this node's trust domain (tokens)",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.home / 'dms.db'}"

    def shown(self) -> dict[str, Any]:
        """The effective values as plain data, secrets masked."""
        data = self.model_dump(mode="json")
        for name, value in data.items():
            if isinstance(getattr(self, name), SecretStr) and value is not None:
                data[name] = "********"
        data["database_url"] = masked_url(self.database_url)
        if data.get("db_url"):
            data["db_url"] = masked_url(data["db_url"])
        return data


def masked_url(url: str) -> str:
    """A database URL with its password (if any) masked, for showing."""
    return _URL_PASSWORD.sub(r"\1********@", url)


def home_from_env() -> Path:
    return Path(os.environ.get("DMS_HOME") or "~/.dms").expanduser()


def load_settings(**overrides: Any) -> Settings:
    home = Path(overrides.pop("home", None) or home_from_env()).expanduser()
    toml_path = home / "config.toml"
    if toml_path.exists():
        try:
            written = tomllib.loads(toml_path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{toml_path} is not valid TOML: {exc}") from None
        if "passphrase" in written:  # a secret in a plain file is what the keystore prevents
            raise ConfigError(
                f"{toml_path}: remove 'passphrase'; a passphrase never goes in a file "
                "(use dms unlock, or DMS_PASSPHRASE)"
            )

    class _HomeSettings(Settings):
        model_config = SettingsConfigDict(toml_file=toml_path)

    try:
        settings = _HomeSettings(home=home, **overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"bad configuration value for '{where}': {err['msg']}") from None
    return settings
