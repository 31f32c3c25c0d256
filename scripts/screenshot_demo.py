"""Screenshot of the web demo (app.py) after a finished upscale, e.g. for the README: headless
Chromium uploads an LR image, clicks "Upscale x4", waits for the before/after slider and the status
line, takes the picture (the window, 1280x1000 by default).

    python scripts/screenshot_demo.py            # smoke weights, examples/astronaut.png -> docs/demo.png
    python scripts/screenshot_demo.py --out out.png -- --ckpt weights/BiMaCoSR.pth  # app.py flags after --

Starts app.py (this Python) on 127.0.0.1:--port, waits until it answers, stops it with SIGINT at
the end. Not part of the test suite; needs Playwright for Python and a Chromium (Playwright's own
browser download is not needed): on Debian/Ubuntu

    apt-get update && apt-get install -y chromium && pip install playwright
"""
import argparse
import importlib.util
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from io import BytesIO
from pathlib import Path

from PIL import Image

from bimacosr.cli import argument_parser
from bimacosr.config import REPO_ROOT

INSTALL = "apt-get update && apt-get install -y chromium && pip install playwright"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# --no-sandbox: Chromium refuses to run as root otherwise; the page is our own, on loopback.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def parse_args() -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs/demo.png",
                   help="PNG to write (default: docs/demo.png)")
    p.add_argument("--image", type=Path, default=REPO_ROOT / "examples/astronaut.png",
                   help="LR image to upload (default: examples/astronaut.png)")
    p.add_argument("--port", type=int, default=7870, help="port app.py serves on")
    p.add_argument("--wait_s", type=float, default=300,
                   help="longest wait for the page and for the upscale, seconds")
    p.add_argument("--size", type=int, nargs=2, default=(1280, 1000), metavar=("W", "H"),
                   help="window size in pixels (default: 1280 1000)")
    p.add_argument("app_args", nargs="*", help="app.py flags, after -- (default: --smoke)")
    return p.parse_args()


def wait_until_up(app: subprocess.Popen, url: str, wait_s: float, log: Path) -> None:
    """Return once ``url`` answers; exit with the app's log if it stops or takes over ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if app.poll() is not None:
            sys.exit(f"error: app.py stopped:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except OSError:
            time.sleep(1)
    sys.exit(f"error: {url} did not answer in {wait_s:.0f} s:\n{log.read_text()}")


def screenshot(browser_path: str, url: str, image: Path, out: Path, size: tuple[int, int],
               wait_s: float) -> None:
    """Upload ``image`` on the page at ``url``, run the upscale, write the finished page to ``out``."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": size[0], "height": size[1]})
        page.goto(url)
        page.locator("input[type=file]").first.set_input_files(image)
        page.get_by_role("button", name="Upscale x4").click()
        # the status line is written with the outputs; then wait for the slider's pictures to load
        status = page.get_by_label("run", exact=True)
        expect(status).to_have_value(re.compile(r"^\d+x\d+ -> "), timeout=wait_s * 1000)
        page.wait_for_function("[...document.querySelectorAll('img')].every(i => i.complete)")
        page.mouse.move(0, 0)  # no hover effects in the picture
        png = page.screenshot()
        browser.close()
    save_small(png, out)


def save_small(png: bytes, out: Path) -> None:
    """Write the screenshot as a 256-colour PNG (Floyd-Steinberg dithered): about half the size of
    the full-colour one, no visible difference."""
    rgb = Image.open(BytesIO(png)).convert("RGB")
    palette = rgb.quantize(256, method=Image.Quantize.MEDIANCUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    rgb.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(out, optimize=True)


def main() -> int:
    args = parse_args()
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if browser is None or importlib.util.find_spec("playwright") is None:
        sys.exit(f"error: Chromium or Playwright for Python is missing; install them with: {INSTALL}")
    if not args.image.is_file():
        sys.exit(f"error: {args.image} is not a file")
    url = f"http://127.0.0.1:{args.port}/"
    cmd = [sys.executable, str(REPO_ROOT / "app.py"), *(args.app_args or ["--smoke"]),
           "--host", "127.0.0.1", "--port", str(args.port)]
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        app = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        try:
            wait_until_up(app, url, args.wait_s, Path(log.name))
            screenshot(browser, url, args.image, args.out, args.size, args.wait_s)
        except AssertionError:  # Playwright's expect: no result in time
            sys.exit(f"error: no result on the page in {args.wait_s:.0f} s; app.py's log:\n"
                     f"{Path(log.name).read_text()}")
        finally:
            app.send_signal(signal.SIGINT)
            try:
                app.wait(timeout=30)
            except subprocess.TimeoutExpired:
                app.kill()
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
