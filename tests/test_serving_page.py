"""The page at `/`, in a real headless Chromium (Debian's package) driven by Playwright."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from serving_server import EXPERTS, ServerThread, tiny_xlora

CHROMIUM = Path("/usr/bin/chromium")
EXPERT_RGB = ["214, 39, 40", "44, 160, 44", "31, 119, 180"]  # the page's first three colours
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason="the page test needs Debian's chromium at /usr/bin/chromium: "
    "apt-get install -y chromium (.ci/run installs it)",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    model, tokenizer = tiny_xlora(tmp_path_factory.mktemp("page"))
    server = ServerThread(model, tokenizer).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-ready=true]")
        yield page
        browser.close()


def test_static_files_ship_with_the_package(server) -> None:
    html = httpx.get(server.url + "/").text
    assert '<script src="/page/page.js">' in html and "http" not in html.split("<body>")[1]
    assert httpx.get(server.url + "/page/page.js").status_code == 200


def test_answer_streams_in_coloured_tokens_with_a_legend(page) -> None:
    legend = page.locator("#legend .legend-item")
    assert legend.all_inner_texts() == list(EXPERTS)
    page.fill("#max-tokens", "12")
    page.fill("#prompt", "what is two plus two?")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelector('#heatmap').dataset.drawn === '14'")
    tokens = page.locator(".msg.assistant .tok")
    assert tokens.count() == 12
    experts = tokens.evaluate_all("els => els.map(e => Number(e.dataset.expert))")
    colours = tokens.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
    weights_of = tokens.evaluate_all("els => els.map(e => JSON.parse(e.dataset.weights))")
    for expert, shade, weights in zip(experts, colours, weights_of, strict=True):
        assert expert == max(range(3), key=lambda e: weights[e])  # the dominant expert
        assert shade.startswith(f"rgba({EXPERT_RGB[expert]}, ")  # in its legend colour
    swatches = legend.locator(".swatch").evaluate_all(
        "els => els.map(e => getComputedStyle(e).backgroundColor)"
    )
    assert swatches == [f"rgb({rgb})" for rgb in EXPERT_RGB]

    tokens.first.hover()
    tip = page.locator("#tip")
    tip.wait_for(state="visible")
    for name in EXPERTS:
        assert name in tip.inner_text()
    weights = json.loads(tokens.first.get_attribute("data-weights"))
    assert f"{max(weights):.3f}" in tip.inner_text()


def test_switching_to_frozen_and_to_a_fixed_mix(page) -> None:
    page.click("#clear")
    page.check("input[name=mode][value=frozen]")
    page.fill("#prompt", "hello")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant[data-mode=frozen] .tok >> nth=3")
    page.wait_for_function("!document.querySelector('#send').disabled")
    weights = page.locator(".msg.assistant .tok").evaluate_all(
        "els => els.map(e => e.dataset.weights)"
    )
    assert len(set(weights[1:])) == 1  # frozen: one mix after the first token

    page.click("#clear")
    page.uncheck("#use-chat")  # plain text: /v1/completions
    page.locator("#sliders input").nth(2).fill("1")  # bio
    page.locator("#sliders input").nth(0).fill("0")
    assert page.is_checked("input[name=mode][value=fixed]")  # moving a slider picks the mix
    page.fill("#prompt", "hello")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant[data-mode=fixed] .tok >> nth=3")
    page.wait_for_function("!document.querySelector('#send').disabled")
    experts = page.locator(".msg.assistant .tok").evaluate_all(
        "els => els.map(e => e.dataset.expert)"
    )
    assert set(experts) == {"2"}
