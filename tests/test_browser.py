"""The web page in a real headless Chromium (Debian's package) against the real server.

Playwright drives the system browser, never one it downloads: set IMAGEREC_CHROMIUM or put
`chromium` on PATH. With CI set, a missing browser fails these tests instead of skipping them.
Screenshots of the page with results go to test-artifacts/ at the repository root.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import pytest
import requests

from live_server import running_server

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # reported by the `browser` fixture, as a skip or (under CI) a failure
    sync_playwright = None

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLES = FIXTURES / "samples"
BUNDLED = Path(__file__).resolve().parents[1] / "models" / "cifar10"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
# The test machine has no internet: keep Chromium from phoning home and retrying refusals.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",  # containers often give /dev/shm only 64 MB
]
TIMEOUT_MS = 30_000  # a shared CI core can be slow to run the model; the page is not


def unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser tests (apt-get install -y chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        unavailable("playwright is not installed (pip install -e '.[test]')")
    executable = os.environ.get("IMAGEREC_CHROMIUM") or shutil.which("chromium")
    if not executable:
        unavailable("no chromium browser: set IMAGEREC_CHROMIUM or put chromium on PATH")
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(card_bundle, tmp_path_factory):
    """`imagerec serve` on a free port, ready (model loaded) before the first test."""
    with running_server(card_bundle, tmp_path_factory.mktemp("serve")) as live:
        yield live.url


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 900}, base_url=server)
    page = context.new_page()
    page.goto("/")
    yield page
    context.close()


def api_label(server: str, path: Path) -> str:
    """The label the API itself gives `path`: what the page must show."""
    files = {"image": (path.name, path.read_bytes(), "image/jpeg")}
    response = requests.post(server + "/v1/predict", files=files, timeout=60)
    response.raise_for_status()
    return response.json()["results"][0]["label"]


def result_for(page, name: str):
    return page.locator("#results > li").filter(
        has=page.locator(".filename", has_text=re.compile(f"^{re.escape(name)}$"))
    )


def screenshot(page, name: str) -> Path:
    """The whole page, by growing the viewport to it: Chromium's full-page capture drops touch
    emulation, which would show a phone the desktop layout."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    height = page.evaluate("document.documentElement.scrollHeight")
    page.set_viewport_size({"width": page.viewport_size["width"], "height": height})
    page.screenshot(path=str(path))
    return path


@pytest.fixture(scope="module")
def repository_server(card_bundle, tmp_path_factory):
    """`imagerec serve --models DIR` over the bundled CIFAR-10 model and the card bundle."""
    repository = tmp_path_factory.mktemp("repository")
    shutil.copytree(BUNDLED, repository / "cifar10")
    shutil.copytree(card_bundle, repository / "cifar-small")
    with running_server(repository, tmp_path_factory.mktemp("serve"), models=True) as live:
        yield live.url


def test_the_page_lets_a_person_pick_a_model_and_shows_what_to_expect_of_each(
    browser, repository_server
):
    context = browser.new_context(
        viewport={"width": 1100, "height": 900}, base_url=repository_server
    )
    page = context.new_page()
    page.goto("/")
    picker = page.get_by_label("Model", exact=True)
    expect(picker.locator("option")).to_have_text(["cifar-small", "cifar10"])

    # The bundled model was trained on every image: the page gives its recipe's estimate.
    picker.select_option("cifar10")
    expect(page.locator("#model-name")).to_have_text("cifar10")
    expect(page.locator("#model-accuracy-kind")).to_have_text("Expected accuracy")
    expect(page.locator("#model-accuracy")).to_have_text(re.compile(r"^90[.,]9\s?%$"))
    expect(page.locator("#model-accuracy-source")).to_contain_text("mean of 3 training runs")
    page.locator("#file-input").set_input_files(str(SAMPLES / "cat.jpg"))
    result = result_for(page, "cat.jpg")
    expect(result.locator(".state")).to_have_text("Most likely: cat")
    expect(result.locator(".timing")).to_contain_text("by cifar10, version ")

    # The other model: its own held-out validation accuracy, and its answers name it.
    picker.select_option("cifar-small")
    expect(page.locator("#model-accuracy-kind")).to_have_text("Validation accuracy")
    page.locator("#file-input").set_input_files(str(SAMPLES / "dog.jpg"))
    expect(result_for(page, "dog.jpg").locator(".timing")).to_contain_text("by cifar-small")
    screenshot(page, "page-model-picker.png")
    context.close()


def test_the_page_names_its_model_and_links_the_model_card(page, card_bundle):
    expect(page.locator("#model-status")).to_have_text("Ready: 10 kinds of things.")
    expect(page.locator("#model-name")).to_have_text(card_bundle.name)
    expect(page.locator("#model-labels")).to_contain_text("airplane, automobile, bird")
    expect(page.locator("#model-accuracy")).to_have_text(re.compile(r"^\d+(\.\d)?%$"))

    for title, name in (("Confusion matrix", "confusion.png"), ("Training curves", "training.png")):
        link = page.get_by_role("link", name=title)
        query = rf"\?model={card_bundle.name}&version=[0-9a-f]{{12}}$"
        expect(link).to_have_attribute("href", re.compile(rf"^/v1/model/card/{name}{query}"))
        picture = page.request.get(link.get_attribute("href"))
        assert picture.ok and picture.headers["content-type"] == "image/png"


def test_an_uploaded_image_shows_the_apis_label_with_bars_and_time(page, server):
    sample = SAMPLES / "cat.jpg"
    page.set_input_files("#file-input", sample)
    result = result_for(page, "cat.jpg")
    expect(result.locator(".state")).to_have_text(f"Most likely: {api_label(server, sample)}")
    expect(result.locator(".score")).to_have_count(3)
    expect(result.locator(".score-value").first).to_have_text(re.compile(r"^\d+\.\d%$"))
    timing = r"^answered by cifar-small, version [0-9a-f]{12} in \d+(\.\d)? m?s$"
    expect(result.locator(".timing")).to_have_text(re.compile(timing))
    expect(result.locator(".thumb img")).to_have_attribute("src", re.compile("^blob:"))


def test_two_images_at_once_show_two_results(page, server):
    samples = [SAMPLES / "ship.jpg", FIXTURES / "cifar_small" / "horse" / "0003.jpg"]
    page.set_input_files("#file-input", samples)
    expect(page.locator("#results > li")).to_have_count(2)
    for path in samples:
        state = result_for(page, path.name).locator(".state")
        expect(state).to_have_text(f"Most likely: {api_label(server, path)}")
    expect(page.locator("#results > li[aria-busy]")).to_have_count(0)
    shot = screenshot(page, "webpage-desktop.png")
    assert shot.stat().st_size > 10_000


TEXT_FILE = {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"shopping: milk\n"}


def test_a_text_file_shows_the_servers_refusal_in_words(page):
    with page.expect_response(lambda r: "/v1/predict" in r.url) as answer:
        page.set_input_files("#file-input", files=[TEXT_FILE])
    assert answer.value.status == 415  # the server decided, not the page
    result = result_for(page, "notes.txt")
    expect(result).to_have_class(re.compile(r"\bfailed\b"))
    expect(result.locator(".state")).to_have_text(
        "“notes.txt” is not a picture the model can read. Use a JPEG, PNG, WebP or BMP image."
    )
    expect(result.locator(".state")).not_to_contain_text("{")


def test_dropped_and_pasted_images_are_recognised(page, server):
    sample = SAMPLES / "dog.jpg"
    encoded = base64.b64encode(sample.read_bytes()).decode()
    page.evaluate(
        """([encoded, name]) => {
            const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
            const transfer = () => {
                const data = new DataTransfer();
                data.items.add(new File([bytes], name, { type: "image/jpeg" }));
                return data;
            };
            const zone = document.getElementById("drop");
            zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer(), bubbles: true }));
            document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: transfer() }));
        }""",
        [encoded, sample.name],
    )
    label = api_label(server, sample)
    expect(result_for(page, "dog.jpg").locator(".state")).to_have_text(f"Most likely: {label}")
    pasted = result_for(page, "Pasted image 1").locator(".state")
    expect(pasted).to_have_text(f"Most likely: {label}")


def catch_file_choosers(page) -> None:
    # Playwright turns on file-chooser interception without waiting; subscribe well before.
    page.on("filechooser", lambda _chooser: None)


def test_the_drop_zone_opens_the_file_dialog_from_the_keyboard(page, server):
    catch_file_choosers(page)
    expect(page.get_by_role("link", name="Training curves")).to_be_visible()
    for _ in range(10):  # skip link, model card links, then the drop zone
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "drop":
            break
    expect(page.locator("#drop")).to_be_focused()
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    assert chooser.value.is_multiple()
    sample = SAMPLES / "frog.jpg"
    chooser.value.set_files(sample)
    expect(result_for(page, "frog.jpg").locator(".state")).to_have_text(
        f"Most likely: {api_label(server, sample)}"
    )


def test_a_page_opened_while_the_model_loads_says_so_then_catches_up(browser, server):
    context = browser.new_context(base_url=server)
    try:
        page = context.new_page()
        refused = []

        def not_ready_once(route):
            if refused:
                return route.continue_()
            refused.append(route.request.url)
            error = {"code": "not_ready", "message": "the model is still loading"}
            return route.fulfill(status=503, json={"error": error})

        page.route("**/v1/models", not_ready_once)
        page.goto("/")
        expect(page.locator("#model-status")).to_have_text(
            "The model is still loading. This page updates when it is ready."
        )
        expect(page.locator("#model-facts")).to_be_hidden()
        expect(page.locator("#model-card")).to_be_hidden()
        expect(page.locator("#model-status")).to_have_text("Ready: 10 kinds of things.")
        expect(page.locator("#model-facts")).to_be_visible()
    finally:
        context.close()


def test_server_trouble_is_put_in_words(page):
    answers = iter(
        [
            lambda route: route.fulfill(
                status=503,
                json={"error": {"code": "not_ready", "message": "the model is still loading"}},
            ),
            lambda route: route.abort("connectionrefused"),
            lambda route: route.fulfill(
                status=413, json={"error": {"code": "payload_too_large", "message": "too big"}}
            ),
        ]
    )
    page.route("**/v1/predict*", lambda route: next(answers)(route))
    expected = [
        "The model is still loading. Try again in a few seconds.",
        "Cannot reach the server. Check that it is running and that you are online, "
        "then try again.",
        "“big.jpg” is too large to send (16 bytes). Try a smaller picture.",
    ]
    for message in expected:
        # One upload at a time, so each meets the answer meant for it.
        page.set_input_files("#file-input", files=[_jpeg("big.jpg")])
        expect(page.locator("#results > li").first.locator(".state")).to_have_text(message)


def _jpeg(name: str) -> dict:
    return {"name": name, "mimeType": "image/jpeg", "buffer": b"\xff\xd8\xff" + bytes(13)}


def test_a_phone_sees_the_camera_and_no_sideways_scrolling(browser, server):
    context = browser.new_context(
        viewport={"width": 375, "height": 812}, is_mobile=True, has_touch=True
    )
    try:
        page = context.new_page()
        catch_file_choosers(page)
        page.goto(server)
        expect(page.get_by_role("button", name="Take a photo")).to_be_visible()
        with page.expect_file_chooser() as chooser:
            page.get_by_role("button", name="Take a photo").tap()
        chooser.value.set_files(SAMPLES / "airplane.jpg")
        page.set_input_files(
            "#file-input",
            [SAMPLES / "automobile.jpg", FIXTURES / "cifar_small" / "bird" / "0001.jpg"],
        )
        expect(page.locator("#results .state", has_text="Most likely")).to_have_count(3)
        pdf = {"name": "report.pdf", "mimeType": "application/pdf", "buffer": b"%PDF-1.4\n%%EOF\n"}
        page.set_input_files("#file-input", files=[pdf])
        expect(result_for(page, "report.pdf").locator(".state")).to_have_text(
            "“report.pdf” is a PDF document. Use a JPEG, PNG, WebP or BMP image."
        )
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        screenshot(page, "webpage-phone.png")
    finally:
        context.close()


def test_with_api_keys_the_page_asks_for_one_and_works_with_it(browser, card_bundle, tmp_path):
    """A server that needs a key: the page asks for it, keeps it in the tab's session storage
    and sends it with every request, the model card's files included."""
    env = {"IMAGEREC_API_KEYS": "page-key-7"}
    with running_server(card_bundle, tmp_path, env=env) as live:
        context = browser.new_context(viewport={"width": 1100, "height": 900}, base_url=live.url)
        page = context.new_page()
        page.goto("/")
        expect(page.locator("#model-status")).to_contain_text("needs an API key")
        key = page.get_by_label("Key", exact=True)
        expect(key).to_be_focused()
        key.fill("wrong-key")
        page.get_by_role("button", name="Use this key").click()
        expect(page.locator("#key-error")).to_have_text(re.compile("not accepted"))
        key.fill("page-key-7")
        page.get_by_role("button", name="Use this key").click()
        expect(page.locator("#model-status")).to_have_text("Ready: 10 kinds of things.")
        assert page.evaluate("sessionStorage.getItem('imagerec-api-key')") == "page-key-7"
        link = page.get_by_role("link", name="Confusion matrix")
        expect(link).to_have_attribute("href", re.compile("^blob:"))
        page.locator("#file-input").set_input_files(str(SAMPLES / "cat.jpg"))
        result = result_for(page, "cat.jpg")
        expect(result.locator(".state")).to_have_text(re.compile("^Most likely: "))
        screenshot(page, "page-api-key.png")

        page.get_by_role("button", name="Forget it").click()
        assert page.evaluate("sessionStorage.getItem('imagerec-api-key')") is None
        page.locator("#file-input").set_input_files(str(SAMPLES / "dog.jpg"))
        expect(result_for(page, "dog.jpg").locator(".state")).to_contain_text("API key")
        context.close()
