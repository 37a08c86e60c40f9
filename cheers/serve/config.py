"""Settings of ``cheers serve``: where it listens, its limits and how it batches."""

from __future__ import annotations

from dataclasses import dataclass, fields

from cheers.errors import ConfigError

# a browser on this machine reaches a loopback server by these; a DNS-rebound name is none of them
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


@dataclass(kw_only=True)
class ServeConfig:
    """Every limit answers a request over it with a 4xx in OpenAI's error JSON.

    ``max_batch`` bounds the rows of one sampler batch (an image request of ``n`` images is ``n``
    rows; CFG doubles them inside the sampler) and the chat rows decoding together; 1 serves
    one request at a time. ``batch_window_ms``: how long the first image request of a batch
    waits for others to join it.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str = "cheers"
    max_body_bytes: int = 32 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8  # images in one chat request
    max_prompt_tokens: int = 4096  # after image placeholders expand into image tokens
    max_prompt_chars: int = 65536  # checked before tokenizing, so a huge prompt costs nothing
    max_json_values: int = 100_000  # separators in a body, checked before parsing it
    max_tokens: int = 1024  # the most a chat request may ask for
    default_max_tokens: int = 256  # a chat without max_tokens (capped by max_tokens)
    max_n: int = 8
    max_steps: int = 250
    queue_size: int = 64  # requests waiting or running; one more gets a 429
    max_batch: int = 16
    batch_window_ms: float = 20.0
    request_timeout: float | None = None  # seconds from arrival to the answer's end; None: no limit
    allowed_hosts: tuple[str, ...] | None = None  # Host header names; None: the bound address and loopback names
    cors_origins: tuple[str, ...] = ()  # origins a browser may call the API from; none by default

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and f.name != "port":
                if f.name == "request_timeout" and value <= 0:
                    raise ConfigError(f"serve setting request_timeout={value} must be > 0 (or unset: no limit)")
                minimum = 0 if f.name in ("batch_window_ms", "request_timeout") else 1
                if value < minimum:
                    raise ConfigError(f"serve setting {f.name}={value} must be >= {minimum}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"serve setting port={self.port} must be in 0..65535")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("serve setting api_key is empty; leave it unset to serve without a key")
        for name in ("allowed_hosts", "cors_origins"):
            bad = [h for h in getattr(self, name) or () if not isinstance(h, str) or not h.strip()]
            if bad:
                raise ConfigError(f"serve setting {name} holds an empty name: {getattr(self, name)!r}")

    def host_names(self) -> set[str] | None:
        """The names a request's ``Host`` header may carry (lower case, no port); None: any."""
        if self.allowed_hosts is not None:
            names = {h.strip().lower().strip("[]") for h in self.allowed_hosts}
            return None if "*" in names else names
        return {*LOOPBACK_NAMES, self.host.lower().strip("[]")}
