"""Batch jobs: `python -m cascade batch jobs.jsonl --out DIR [--ray ADDRESS] [--workers N]`.

Each line of the JSONL file is one request in the API's JSON (SD.Next's txt2img fields, `cascade_*` options). Every
image is one unit of work, written as `DIR/<line>-<image>.png` (with its infotext, atomically: a temporary file
renamed into place) and then recorded as one line of `DIR/results.jsonl`. Image i of a line has seed + i, exactly
the image the API would return for it (image i of a batch equals a single run with seed + i).

Resuming: a unit is finished when results.jsonl records it and its PNG exists; everything else is (re)done, so a
re-run after a crash skips finished images and redoes half-finished ones (a PNG with no record, a temporary file).
A line with seed -1 gets a seed derived from the line's text, so a redone image is the same image. The manifest is
rewritten at start with only the records whose PNGs exist (a torn last line from a kill is dropped), so every
image appears in it exactly once. A bad line is reported with its line number (`jobs.jsonl:7: ...`), recorded, and
the rest goes on.

On Ray (`--ray local|auto|ADDRESS`), `--workers N` actors each keep a pipeline loaded (one GPU each where the
cluster has GPUs) and render units; the driver writes the files, so outputs land where the command runs. A dead
actor's units go to the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from cascade.errors import CascadeError

from .config import ServeConfig

log = logging.getLogger(__name__)

MANIFEST = "results.jsonl"
MAX_LINE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Unit:
    """One image to make: line `line` (1-based), image `index` of that line."""

    line: int
    index: int
    fields: dict[str, Any]  # flat engine fields, batch_size 1, the image's own seed
    model: str | None

    @property
    def file(self) -> str:
        return f"{self.line:06d}-{self.index:03d}.png"

    @property
    def key(self) -> tuple[int, int]:
        return (self.line, self.index)


@dataclass(frozen=True)
class BadLine:
    line: int
    error: str


def line_seed(line: int, text: str) -> int:
    """The seed of a line that asks for a random one: stable across runs, so a resumed image is the same image."""
    digest = hashlib.sha256(f"{line}\n{text}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 4294967294


def plan(path: Path, max_images: int = 1024) -> Iterator[Unit | BadLine]:
    """The units of every good line, and a BadLine for every line that cannot be made (with the reason)."""
    from cascade.api_fields import from_sdnext
    from cascade.request import build_request

    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if len(raw) > MAX_LINE_BYTES:
                yield BadLine(number, f"the line is longer than {MAX_LINE_BYTES} bytes")
                continue
            text = raw.decode("utf-8", errors="replace").strip()
            if not text or text.startswith("#"):
                continue
            try:
                body = json.loads(text)
                api = from_sdnext(body, draw_seed=lambda: line_seed(number, text))
                if api.images > max_images:
                    raise CascadeError(f"{api.images} images on one line; at most {max_images}")
                if api.controlnets:
                    raise CascadeError(f"{api.controlnets_key}: ControlNets are not supported in batch jobs; send "
                                       "the request to the server's /sdapi/v1/txt2img")
                units = []
                for k in range(api.n_iter):
                    fields = api.iteration(k)
                    batch = int(fields.get("batch_size", 1))
                    for i in range(batch):
                        single = {**fields, "batch_size": 1, "seed": int(fields["seed"]) + i}
                        build_request(single)  # every problem of the line is found before any image is made
                        units.append(Unit(number, k * batch + i, single, api.model))
            except json.JSONDecodeError as err:
                yield BadLine(number, f"not valid JSON: {err}")
                continue
            except CascadeError as err:
                yield BadLine(number, str(err))
                continue
            yield from units


def read_manifest(out: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """Finished units: records of results.jsonl whose PNG exists. Torn or foreign lines are skipped."""
    done: dict[tuple[int, int], dict[str, Any]] = {}
    manifest = out / MANIFEST
    if not manifest.is_file():
        return done
    for raw in manifest.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(raw)
            key = (int(record["line"]), int(record["index"]))
            file = str(record["file"])
        except (ValueError, KeyError, TypeError):
            continue
        if "/" not in file and "\\" not in file and (out / file).is_file():
            done[key] = record
    return done


def _clean_partials(out: Path) -> int:
    """Temporary files a killed run left (cascade.atomic names them .<name>.<random>.partial)."""
    from cascade.atomic import PARTIAL_SUFFIX

    removed = 0
    for path in out.glob(f".*{PARTIAL_SUFFIX}"):
        if path.is_file():
            path.unlink()
            removed += 1
    return removed


class Manifest:
    """results.jsonl, append-only after a rewrite with the finished records; each record fsync'ed."""

    def __init__(self, out: Path, done: dict[tuple[int, int], dict[str, Any]]):
        from cascade.atomic import atomic_write_text

        self.path = out / MANIFEST
        text = "".join(json.dumps(r) + "\n" for _, r in sorted(done.items()))
        atomic_write_text(self.path, text, what="manifest")
        self.file = open(self.path, "a", encoding="utf-8")

    def add(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


# --- rendering one unit (in-process or on a Ray actor) -----------------------------------------------------------
class Renderer:
    """Holds a pipeline (per model name) and turns a unit into PNG bytes with its infotext."""

    def __init__(self, config: ServeConfig):
        from .catalog import Catalog

        if config.torch_threads:
            import torch

            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.catalog = Catalog(config)
        self.session = None
        self.entry = None
        self.names: dict[str, str] = {}

    def render(self, unit: Unit) -> dict[str, Any]:
        from cascade.pipeline import to_pil
        from cascade.request import build_request
        from cascade.session import open_pipeline

        from .render import infotexts_for, png_bytes

        entry = self.catalog.find(unit.model)
        if entry != self.entry:
            self.session, self.entry = None, None
            self.session = open_pipeline(entry.spec(self.config))
            self.entry, self.names = entry, self.session.model_names()
        t0 = time.monotonic()
        result = self.session.pipeline.generate(build_request(unit.fields))
        text = infotexts_for(result, self.names)[0]
        png = png_bytes(to_pil(result.images)[0], text)
        return {"png": png, "seed": result.seeds[0], "infotext": text, "model": entry.name,
                "seconds": time.monotonic() - t0, "worker": f"{os.uname().nodename}:{os.getpid()}"}


# --- the driver --------------------------------------------------------------------------------------------------
@dataclass
class BatchReport:
    made: int = 0
    skipped: int = 0
    bad_lines: int = 0
    failed: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.bad_lines == 0 and self.failed == 0


def run_batch_jobs(jobs: Path, out: Path, config: ServeConfig, *, ray_address: str | None = None, workers: int = 1,
                   quiet: bool = False, stop_after: int | None = None,
                   report: Callable[[str], None] | None = None) -> BatchReport:
    """Run every unit of `jobs` not yet finished in `out`. `stop_after`: stop after that many images (a stand-in for
    an interrupted run, for tests). Messages about bad lines go to `report` (default: stderr)."""
    from cascade.atomic import check_output_target

    say = report or (lambda text: print(text, file=sys.stderr))
    if not jobs.is_file():
        raise CascadeError(f"{jobs}: no such jobs file (one JSON request per line)")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    result = BatchReport()
    units: list[Unit] = []
    for item in plan(jobs):
        if isinstance(item, BadLine):
            result.bad_lines += 1
            say(f"{jobs.name}:{item.line}: {item.error}")
        else:
            units.append(item)
    _clean_partials(out)
    done = read_manifest(out)
    manifest = Manifest(out, {k: v for k, v in done.items() if k in {u.key for u in units}})
    todo = [u for u in units if u.key not in done]
    result.skipped = len(units) - len(todo)
    if stop_after is not None:
        todo = todo[:stop_after]
    for unit in todo:
        check_output_target(out / unit.file)
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(units), initial=result.skipped, desc="images", unit="img", file=sys.stderr)

    def finish(unit: Unit, rendered: dict[str, Any]) -> None:
        from cascade.atomic import atomic_write

        atomic_write(out / unit.file, lambda f: f.write(rendered["png"]), what="output")
        manifest.add({"line": unit.line, "index": unit.index, "file": unit.file, "seed": rendered["seed"],
                      "model": rendered["model"], "seconds": round(rendered["seconds"], 3),
                      "worker": rendered["worker"], "infotext": rendered["infotext"]})
        result.made += 1
        if bar is not None:
            bar.update(1)

    def failed(unit: Unit, error: BaseException) -> None:
        result.failed += 1
        say(f"{jobs.name}:{unit.line}: image {unit.index} failed: {error}")

    try:
        if ray_address is None:
            _run_local(todo, config, finish, failed)
        else:
            _run_ray(todo, config, ray_address, workers, finish, failed)
    finally:
        manifest.close()
        if bar is not None:
            bar.close()
    result.seconds = time.monotonic() - t0
    return result


def _run_local(todo: list[Unit], config: ServeConfig, finish, failed) -> None:
    renderer = Renderer(config)
    for unit in todo:
        try:
            rendered = renderer.render(unit)
        except CascadeError as err:
            failed(unit, err)
            continue
        finish(unit, rendered)


def _run_ray(todo: list[Unit], config: ServeConfig, address: str, workers: int, finish, failed) -> None:
    """One actor per worker (a GPU each where the cluster has GPUs), two units in flight per actor."""
    from .ray_serve import cluster_gpus, connect

    ray = connect(address, config)
    resources = {"num_gpus": 1} if cluster_gpus() > 0 else {"num_cpus": 1}
    actor_class = ray.remote(max_restarts=0, **resources)(Renderer)
    actors = [actor_class.remote(config) for _ in range(max(1, workers))]
    pending = list(reversed(todo))
    in_flight: dict[Any, tuple[Unit, Any]] = {}

    def feed(actor) -> None:
        if pending:
            unit = pending.pop()
            in_flight[actor.render.remote(unit)] = (unit, actor)

    try:
        _drain(ray, actors, pending, in_flight, feed, finish, failed)
    finally:
        for actor in actors:
            ray.kill(actor)


def _drain(ray, actors: list, pending: list, in_flight: dict, feed, finish, failed) -> None:
    """Hand out units until none is left; a dead actor's unit goes back to the pending list for the others."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    for actor in actors:
        feed(actor)
        feed(actor)
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        ref = ready[0]
        unit, actor = in_flight.pop(ref)
        try:
            rendered = ray.get(ref)
        except (ActorDiedError, ActorUnavailableError, RayActorError) as err:
            if actor in actors:
                actors.remove(actor)
                log.warning("a batch worker died (%s); %d left", err, len(actors))
            pending.append(unit)
            if not actors:
                raise CascadeError("every Ray batch worker died; re-run the command to resume") from None
            for other in actors:
                if sum(1 for _, a in in_flight.values() if a is other) < 2:
                    feed(other)
            continue
        except RayTaskError as err:
            cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
            failed(unit, cause)
            feed(actor)
            continue
        finish(unit, rendered)
        feed(actor)
