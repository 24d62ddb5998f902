"""SD.Next glue for the Stable Cascade engine.

Only this package imports SD.Next's `modules.*`, and always lazily inside functions, so every module here can
be imported (and most of them tested) without SD.Next. Host-independent parts:

- `library`      scan the model folder by tensor headers and pair each Stage C with a Stage B;
- `descriptors`  the `models/Diffusers/<name>/` folders that make each pair an SD.Next model;
- `params`       SD.Next's request fields and settings -> engine stage settings;
- `pipeline`     the diffusers-shaped pipeline object SD.Next drives (`StableCascadeSingleFilePipeline`);
- `errors`       the exception that reaches an API caller as a JSON error.

SD.Next-facing parts (lazy `modules.*` imports): `host` (per-request args, infotext, progress, interrupt/skip),
`offload` (SD.Next's offload modes vs our memory planner), `loader` (the wrapped Stable Cascade loader), `hook`
(installing that wrap), `options` (Settings), `routes` (the /cascade/v1 API), `entry` (what
scripts/stable_cascade.py registers).
"""
