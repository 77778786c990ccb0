"""Screenshot of the served page (docs/serve-page.png) with the bundled science model.

Starts `loramix serve models/science-xlora` on a free local port, asks two questions in
headless Chromium (Debian's /usr/bin/chromium, driven by Playwright), hovers a token and
saves the page. Run from the repository root:

    python scripts/serve_screenshot.py [--out docs/serve-page.png]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What peptide do the DNA codons ATG GCC TTT encode?",
    "What is the net charge of the peptide KKDE at pH 7?",
    "A spring with k = 200 N/m is stretched by 5 cm. What is the force in N?",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "serve-page.png"))
    parser.add_argument("--model", default=str(ROOT / "models" / "science-xlora"))
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "loramix.cli", "serve", args.model, "--port", str(port)], env=env
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.5)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path="/usr/bin/chromium",
                args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"],
            )
            page = browser.new_page(viewport={"width": 1100, "height": 820})
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready=true]")
            page.uncheck("#use-chat")  # the science model was trained on plain prompts
            page.fill("#max-tokens", "40")
            for question in QUESTIONS:
                page.fill("#prompt", question)
                page.press("#prompt", "Enter")
                page.wait_for_function("!document.querySelector('#send').disabled", timeout=120_000)
            page.locator(".msg.assistant .tok").nth(3).hover()
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
