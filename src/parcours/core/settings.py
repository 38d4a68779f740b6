"""The settings tree: one typed object built once and passed down."""

from __future__ import annotations

from pathlib import Path

from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OidcProvider(BaseModel):
    """An external OpenID Connect identity provider people may sign in with.

    Set as JSON in ``PARCOURS_OIDC_PROVIDERS`` (a list); README shows Pro Santé
    Connect and FranceConnect. The identity is linked to an existing account by
    ``link_by``: ``rpps`` (the claim ``link_claim`` holds an RPPS number, matched
    on the identifier of the account's Practitioner), ``email`` (matched on the
    account's e-mail), or ``subject`` (only accounts already linked to this
    provider's ``sub``).
    """

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")  # short key used in URLs: /signin/oidc/{name}
    label: str  # shown on the button: "Pro Santé Connect"
    issuer: str
    discovery_url: str | None = None  # default: {issuer}/.well-known/openid-configuration
    client_id: str
    client_secret: str | None = None
    token_auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    scopes: list[str] = Field(default_factory=lambda: ["openid"])
    acr_values: str | None = None  # Pro Santé Connect: "eidas1"
    roles: list[Literal["patient", "proxy", "practitioner", "staff", "admin"]] = Field(default_factory=lambda: ["patient"])  # account roles it signs in
    link_by: Literal["rpps", "email", "subject"] = "email"
    link_claim: str = "email"
    userinfo: bool = False  # also read the claims of the userinfo endpoint (Pro Santé Connect puts the RPPS there)
    # The provider itself is strong authentication (Pro Santé Connect: e-CPS or CPS card),
    # so a professional signing in with it skips the TOTP step.
    second_factor: bool = False
    # Professionals found in the directory by their RPPS get an account at their first sign-in.
    create_accounts: bool = False


class Settings(BaseSettings):
    """Configuration read from the environment (prefix ``PARCOURS_``) and ``.env``.

    ``DATABASE_URL`` (no prefix) selects an external PostgreSQL; without it the
    platform starts an embedded PostgreSQL in ``$PARCOURS_HOME/pgdata``.
    """

    model_config = SettingsConfigDict(env_prefix="PARCOURS_", env_file=".env", extra="ignore")

    home: Path = Path("./var")
    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    base_url: str = "http://127.0.0.1:8000"
    # Size limits protect the server from memory exhaustion by one request.
    max_resource_bytes: int = 8 * 1024 * 1024
    max_bundle_bytes: int = 64 * 1024 * 1024
    max_bundle_entries: int = 10_000
    default_page_size: int = 20
    max_page_size: int = 1000
    db_pool_size: int = 10
    log_level: str = "INFO"
    log_json: bool = False
    # Secret used to sign tokens; generated into $PARCOURS_HOME when not given.
    secret_key: str | None = None
    # Web sessions: signed out after this long without a request, and this long after sign-in whatever happens.
    session_idle_minutes: int = 30
    session_absolute_minutes: int = 12 * 60
    # Sign-in throttling: this many failures within the window locks the account (or the address) for a while.
    signin_window_minutes: int = 15
    signin_max_failures_account: int = 5
    signin_max_failures_ip: int = 50
    signin_lockout_minutes: int = 15
    password_min_length: int = 12
    # Bulk $export: every server process also runs export jobs unless this is off
    # (then run `parcours worker`); NDJSON files are split after this many resources.
    export_worker: bool = True
    export_file_lines: int = 50_000
    # Subscriptions (rest-hook): the first retry comes after this many seconds, then
    # twice as long each time (at most an hour); after the last attempt the
    # Subscription goes to status error.
    subscription_retry_seconds: float = 5.0
    subscription_max_attempts: int = 8
    subscription_timeout_seconds: float = 10.0
    # SMART on FHIR authorization server: lifetimes of access and refresh tokens, and how
    # long a process may take to see a token revoked by another one (revocation cache).
    oauth_access_token_minutes: int = 15
    oauth_refresh_token_days: int = 90
    oauth_revocation_cache_seconds: float = 5.0
    # External OpenID Connect identity providers (JSON list, see OidcProvider).
    oidc_providers: list[OidcProvider] = Field(default_factory=list)
    # Booking notifications: e-mails through this SMTP server (unset host: e-mails are only
    # logged), ``smtp_tls`` none | starttls | tls; SMS through the dev channel (logged).
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_from: str = "Parcours <no-reply@parcours.example>"
    smtp_tls: Literal["none", "starttls", "tls"] = "none"
    smtp_username: str | None = None
    smtp_password: str | None = None
    # Reminders this many hours before an appointment; each server process runs due
    # notification jobs every ``booking_jobs_poll_seconds`` unless the worker is off.
    booking_reminder_hours: list[int] = Field(default_factory=lambda: [48, 2])
    booking_jobs_worker: bool = True
    booking_jobs_poll_seconds: float = 15.0
    # Map tiles of the booking search page ({z}/{x}/{y}); empty: the map shows markers only.
    map_tiles_url: str = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
    # Teleconsultation: the ICE servers (STUN/TURN) given to the browsers, as in RTCConfiguration.iceServers,
    # e.g. [{"urls": "turn:turn.example:3478", "username": "u", "credential": "p"}] (docs/telehealth.md).
    telehealth_ice_servers: list[dict[str, Any]] = Field(default_factory=list)

    # Shared record: document content (encrypted with AES-GCM) goes to ``$PARCOURS_HOME/blobs``
    # unless an S3-compatible bucket is set. Keys: ``record_keys`` {key id: base64 of 32 bytes}
    # and ``record_key_id`` (the one new content is written with); without them the keys are
    # generated into the database secrets (development) and `parcours keys rotate` makes new ones.
    record_blob_dir: Path | None = None
    record_s3_bucket: str | None = None
    record_s3_endpoint: str | None = None
    record_s3_region: str = "us-east-1"
    record_s3_access_key: str | None = None
    record_s3_secret_key: str | None = None
    record_keys: dict[str, str] = Field(default_factory=dict)
    record_key_id: str | None = None
    record_key_refresh_seconds: float = 30.0
    # Uploads: largest accepted file, and the ClamAV daemon's unix socket (unset: no malware scan).
    record_max_upload_bytes: int = 20 * 1024 * 1024
    record_clamd_socket: str | None = None
    # Lab results over HL7 v2: the MLLP listener (unset: none; `parcours serve --mllp-port`), and
    # whether the INS test OIDs (1.2.250.1.213.1.4.10/.11, used by the CI-SIS samples) identify patients.
    mllp_port: int | None = None
    mllp_host: str = "127.0.0.1"
    hl7_accept_test_ins: bool = False
    # New documents and results: the patient is told by e-mail (no clinical detail) by each
    # server process's notice runner unless this is off.
    record_notices_worker: bool = True
    # Secure messaging (docs/messaging.md): attachments are kept in the message itself (base64 in
    # the Communication, so under max_resource_bytes); each server process runs the e-mail notices
    # (no clinical content, at most one per person per interval, after a delay that lets someone
    # online read first) and, when retention_days > 0, deletes conversations idle for that long.
    messaging_max_attachment_bytes: int = 5 * 1024 * 1024
    messaging_max_text_chars: int = 20_000
    messaging_retention_days: int = 0  # 0: kept
    messaging_email_delay_minutes: float = 5.0
    messaging_email_interval_minutes: float = 60.0
    messaging_jobs_worker: bool = True
    messaging_jobs_poll_seconds: float = 30.0
    expertise_jobs_worker: bool = True  # each server process sends tele-expertise due-date reminders
    expertise_jobs_poll_seconds: float = 60.0
    stroke_ack_minutes: int = 5  # a tele-stroke request not acknowledged within this delay goes to the next on call
    stroke_jobs_worker: bool = True  # each server process escalates tele-stroke requests and sends their alerts
    stroke_jobs_poll_seconds: float = 5.0
    messaging_presence_seconds: float = 30.0  # a live socket refreshes its presence this often

    @property
    def fhir_base(self) -> str:
        return self.base_url.rstrip("/") + "/fhir"

    def resolved_home(self) -> Path:
        home = self.home.expanduser().resolve()
        home.mkdir(parents=True, exist_ok=True)
        return home
