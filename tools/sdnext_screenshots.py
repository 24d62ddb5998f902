"""Make docs/sdnext-model-dropdown.png and docs/sdnext-generated.png from a running SD.Next with the extension.

    NODE_PATH=<dir with node_modules/playwright-core> python tools/sdnext_screenshots.py [BASE_URL] [MODEL_TITLE]

Runs tools/sdnext_screenshots.mjs (headless Chromium), then crops and palettes the captures so each PNG stays small.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def crop(full: Image.Image, box: dict, pad: int = 8) -> Image.Image:
    return full.crop((int(box["x"]) - pad, int(box["y"]) - pad, int(box["x"] + box["w"]) + pad, int(box["y"] + box["h"]) + pad))


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["node", str(ROOT / "tools" / "sdnext_screenshots.mjs"), tmp, *argv], check=True)
        out = Path(tmp)
        Image.open(out / "list.png").convert("RGB").quantize(colors=32).save(ROOT / "docs" / "sdnext-model-dropdown.png", optimize=True)
        boxes = json.loads((out / "boxes.json").read_text())
        full = Image.open(out / "full.png").convert("RGB")
        top, gallery, info = crop(full, boxes["model"]), crop(full, boxes["gallery"]), crop(full, boxes["info"])
        canvas = Image.new("RGB", (max(top.width, gallery.width + info.width + 24), top.height + 12 + max(gallery.height, info.height)), (249, 250, 251))
        canvas.paste(top, (0, 0))
        canvas.paste(gallery, (0, top.height + 12))
        canvas.paste(info, (gallery.width + 24, top.height + 12))
        canvas.quantize(colors=64, dither=Image.Dither.NONE).save(ROOT / "docs" / "sdnext-generated.png", optimize=True)


if __name__ == "__main__":
    main(sys.argv[1:])
