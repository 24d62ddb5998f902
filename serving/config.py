"""What a server (or a Ray replica, or a batch worker) is started with. Frozen and picklable: Ray ships it to every
replica, which opens its own pipeline from it."""

from __future__ import annotations

from dataclasses import dataclass, field

from cascade.errors import CascadeError
from cascade.request import REQUEST_MAX_BYTES, REQUEST_MAX_PIXELS

DEFAULT_HOST = "127.0.0.1"  # loopback unless asked: SD.Next's own default is to listen locally too
DEFAULT_PORT = 7861


@dataclass(frozen=True)
class ServeConfig:
    prior: str | None = None  # the default model's files; neither = the embedded tiny model
    decoder: str | None = None
    text_encoder: str | None = None
    stage_a: str | None = None
    models_dir: str | None = None  # more models, picked by name (`sd_model_checkpoint`); only files in here are used
    device: str | None = None
    dtype: str = "auto"
    offload: str = "auto"
    vram: str | None = None
    queue_size: int = 8  # requests waiting (the running one not counted); past it: 503 + Retry-After
    timeout_s: float = 600.0  # per request, queue wait included; past it: stopped at the next step, 504
    api_auth: tuple[tuple[str, str], ...] = ()  # --api-auth user:pass[,user2:pass2] (SD.Next's flag), HTTP Basic
    api_tokens: tuple[str, ...] = ()  # --api-token T: "Authorization: Bearer T"
    max_body_bytes: int = REQUEST_MAX_BYTES  # request bodies (base64 images included)
    max_image_pixels: int = REQUEST_MAX_PIXELS  # a decoded init image, and width x height of a request
    max_images: int = 16  # images per request (batch_size x n_iter)
    max_prompt_chars: int = 20000  # per prompt: each 75 tokens is one more text-encoder pass and cross-attention block
    torch_threads: int | None = None  # per process (Ray replicas on one machine share its cores)
    tags: dict[str, str] = field(default_factory=dict)  # labels shown in /healthz (e.g. the Ray replica)

    def __post_init__(self) -> None:
        if bool(self.prior) != bool(self.decoder):
            raise CascadeError("Give both --prior (Stage C 'main' file) and --decoder (Stage B file), or neither for "
                               "the tiny model.")
        if self.queue_size < 0:
            raise CascadeError(f"--queue-size {self.queue_size} must be 0 or more")
        if not self.timeout_s > 0:
            raise CascadeError(f"--timeout {self.timeout_s} must be more than 0 seconds")
        if (self.max_images < 1 or self.max_body_bytes < 1024 or self.max_image_pixels < 128 * 128
                or self.max_prompt_chars < 1):
            raise CascadeError("--max-images and --max-prompt-chars must be >= 1, --max-body-mb > 0 and "
                               "--max-image-pixels >= 16384")

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_auth or self.api_tokens)


def parse_api_auth(value: str | None) -> tuple[tuple[str, str], ...]:
    """SD.Next's `--api-auth user:pass[,user2:pass2]`."""
    if not value:
        return ()
    out = []
    for item in value.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise CascadeError(f"--api-auth {item.strip()!r} is not user:password (several: user1:pw1,user2:pw2)")
        out.append((user, password))
    return tuple(out)
