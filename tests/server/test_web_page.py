"""The web page at `/`: its files served with their content types and a self-only CSP, nothing loaded from
elsewhere; and, in a real headless chromium (selenium), a photo uploaded through the page gets the caption,
the answer and the label order that the Python API gives for the same photo."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest
from service_helpers import live_server, metric

import blip2.server

STATIC = Path(blip2.server.__file__).with_name("static")
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def test_the_page_and_its_files_are_served_with_types_and_csp(serve):
    client = serve(match=False)
    for path, kind in (
        ("/", "text/html"),
        ("/static/app.js", "text/javascript"),
        ("/static/style.css", "text/css"),
    ):
        got = client.get(path)
        assert got.status_code == 200, path
        assert got.headers["content-type"].split(";")[0] == kind
        csp = got.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert got.headers["x-content-type-options"] == "nosniff"
    assert client.get("/").content == (STATIC / "index.html").read_bytes()
    assert client.get("/static/app.js").content == (STATIC / "app.js").read_bytes()


def test_unknown_static_files_are_json_404s(serve):
    client = serve(match=False)
    for path in ("/static/nothing.js", "/static/index.html", "/static/..%2fweb.py", "/static/"):
        got = client.get(path)
        assert got.status_code == 404, path
        assert got.json()["error"]["type"] == "not_found"


def test_web_config_says_whether_a_key_is_needed(serve):
    assert serve(match=False).get("/web/config").json() == {"api_key_required": False}
    keyed = serve(match=False, api_key="secret")
    assert keyed.get("/web/config").json() == {"api_key_required": True}
    assert keyed.get("/").status_code == 200  # the page itself is public; its API calls carry the key


def test_the_page_is_not_in_the_openapi_schema(serve):
    paths = serve(match=False).get("/openapi.json").json()["paths"]
    assert not {"/", "/static/{name}", "/web/config"} & set(paths)


def test_no_static_file_references_another_origin():
    files = sorted(STATIC.iterdir())
    assert {f.name for f in files} == {"index.html", "app.js", "style.css"}
    for path in files:
        text = path.read_text()
        assert not re.search(r"https?://|//cdn|src=\"//|href=\"//", text), path.name
        assert "<script>" not in text and " on" + "click=" not in text, path.name  # no inline script


def test_the_html_has_labels_for_its_inputs():
    html = (STATIC / "index.html").read_text()
    ids = re.findall(r"<input id=\"([^\"]+)\"", html)
    assert ids, "no inputs found"
    for name in ids:
        assert f'<label for="{name}">' in html, name
    assert html.count('aria-live="polite"') >= 4  # caption, chat, labels, hits


# -- in a real browser ----------------------------------------------------------------------------------------
def _browser():
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip(
            f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); .ci/run installs them"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never runs (it would try the network).
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def test_in_chromium_upload_caption_ask_and_score_labels(checkpoints, retrieval_checkpoints, direct, photos):
    import blip2
    from blip2.server.app import create_app
    from blip2.server.service import Models
    from blip2.server.settings import Settings

    driver = _browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    models = Models(
        blip2.load(checkpoints["opt"], device="cpu", dtype="float32"),
        blip2.load(retrieval_checkpoints["plain"], device="cpu", dtype="float32"),
    )
    photo = photos[1]
    data = photo.read_bytes()
    try:
        with live_server(create_app(Settings(), models)) as url:
            wait = WebDriverWait(driver, 60)
            driver.get(url + "/")
            wait.until(lambda d: d.find_element(By.ID, "status").text == "Ready.")
            assert not driver.find_element(By.ID, "search-panel").is_displayed()  # no /v1/search here

            driver.find_element(By.ID, "file").send_keys(str(photo))
            caption = driver.find_element(By.ID, "caption")
            wait.until(lambda d: caption.get_attribute("data-state") in ("done", "error"))
            assert caption.get_attribute("data-state") == "done", driver.find_element(By.ID, "error").text
            assert caption.text == direct[0].caption([data])[0]

            driver.find_element(By.ID, "question").send_keys("what is in the cup?" + Keys.ENTER)
            answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#chat .answer[data-state=done]"))
            assert answer.text == direct[0].ask([data], ["what is in the cup?"])[0]
            # the page sends the same bytes again: the question reused the caption's vision-tower output
            metrics = httpx.get(f"{url}/metrics").text
            assert metric(metrics, "blip2_image_cache_total", model="model", result="miss") == 1
            assert metric(metrics, "blip2_image_cache_total", model="model", result="hit") == 1

            labels = ["a cat", "a rocket", "a cup of coffee"]
            driver.find_element(By.ID, "labels").send_keys(", ".join(labels))
            driver.find_element(By.CSS_SELECTOR, "#labels-form button").click()
            rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#label-results li"))
            want = direct[1].classify(data, labels)
            assert [r.get_attribute("data-label") for r in rows] == [w["label"] for w in want]
            assert rows[0].text == f"{want[0]['label']}: {100 * want[0]['probability']:.1f}%"
            assert not driver.find_element(By.ID, "error").is_displayed()
            assert _csp_violations(driver) == []
    finally:
        driver.quit()


def test_in_chromium_errors_are_plain_words_and_the_key_field_shows(checkpoints, photos, tmp_path):
    import blip2
    from blip2.server.app import create_app
    from blip2.server.service import Models
    from blip2.server.settings import Settings

    driver = _browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    models = Models(blip2.load(checkpoints["opt"], device="cpu", dtype="float32"), None)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    try:
        with live_server(create_app(Settings(api_key="secret"), models)) as url:
            wait = WebDriverWait(driver, 60)
            driver.get(url + "/")
            key = wait.until(
                lambda d: (
                    d.find_element(By.ID, "api-key")
                    if d.find_element(By.ID, "api-key").is_displayed()
                    else None
                )
            )
            driver.find_element(By.ID, "file").send_keys(str(photos[0]))
            error = driver.find_element(By.ID, "error")
            wait.until(lambda d: error.is_displayed())
            assert "needs an API key" in error.text

            key.send_keys("secret\t")  # change fires on leaving the field
            driver.find_element(By.ID, "file").send_keys(str(broken))
            wait.until(lambda d: d.find_element(By.ID, "caption").get_attribute("data-state") == "error")
            assert error.text.startswith("The server could not read this image"), error.text

            driver.find_element(By.ID, "file").send_keys(str(photos[0]))
            wait.until(lambda d: d.find_element(By.ID, "caption").get_attribute("data-state") == "done")
            driver.find_element(By.ID, "labels").send_keys("a cat, a dog")
            driver.find_element(By.CSS_SELECTOR, "#labels-form button").click()
            wait.until(lambda d: d.find_element(By.ID, "labels-note").is_displayed())
            assert "--match-model" in driver.find_element(By.ID, "labels-note").text
    finally:
        driver.quit()


def _csp_violations(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]


# Dispatches a drop on #drop or a paste on the document carrying `arguments[0]` (base64 JPEG) as a file.
DISPATCH = """
const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], "photo.jpg", {type: "image/jpeg"}));
if (arguments[1] === "drop") {
  document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
} else {
  document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true}));
}
"""

TINY_PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def test_in_chromium_drop_paste_and_search_hits_with_thumbnails(checkpoints, direct, photos):
    """Drop and paste give the API's caption; a stand-in /v1/search (the page's contract: 422 for an empty
    query, else `{"hits": [{"rank", "image", "score", "thumbnail"}]}`) shows the panel and its hits."""
    import base64

    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    import blip2
    from blip2.server.app import create_app
    from blip2.server.service import Models
    from blip2.server.settings import Settings

    driver = _browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    app = create_app(Settings(), Models(blip2.load(checkpoints["opt"], device="cpu", dtype="float32"), None))
    asked = []

    async def search(request: Request) -> Response:
        body = await request.json()
        if not body.get("text"):
            return JSONResponse({"error": {"type": "invalid_request", "message": "text: required"}}, 422)
        asked.append(body)
        hits = [
            {"rank": 1, "image": "a/one.jpg", "score": 0.5, "thumbnail": TINY_PNG},
            {"rank": 2, "image": "b/two.jpg", "score": 0.25, "thumbnail": "/thumb.png"},
            {"rank": 3, "image": "c/three.jpg", "score": 0.125, "thumbnail": "https://example.com/x.png"},
        ]
        return JSONResponse({"hits": hits})

    async def thumb(request: Request) -> Response:
        return Response(base64.b64decode(TINY_PNG.split(",")[1]), media_type="image/png")

    app.router.add_route("/v1/search", search, methods=["POST"])
    app.router.routes.insert(0, app.router.routes.pop())  # ahead of the real /v1/search (no index: 404)
    app.router.add_route("/thumb.png", thumb)
    try:
        with live_server(app) as url:
            wait = WebDriverWait(driver, 60)
            driver.get(url + "/")
            wait.until(lambda d: d.find_element(By.ID, "search-panel").is_displayed())
            caption = driver.find_element(By.ID, "caption")
            for photo, how in ((photos[2], "drop"), (photos[0], "paste")):
                driver.execute_script(DISPATCH, base64.b64encode(photo.read_bytes()).decode(), how)
                wait.until(lambda d: caption.get_attribute("data-state") == "done")
                assert caption.text == direct[0].caption([photo.read_bytes()])[0], how
                driver.execute_script("arguments[0].dataset.state = ''", caption)

            driver.find_element(By.ID, "query").send_keys("a rocket" + Keys.ENTER)
            items = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#hits li"))
            assert asked == [{"text": "a rocket", "k": 12}]
            assert [i.find_element(By.CLASS_NAME, "path").text for i in items] == [
                "1. a/one.jpg",
                "2. b/two.jpg",
                "3. c/three.jpg",
            ]
            images = [i.find_elements(By.TAG_NAME, "img") for i in items]
            assert [len(found) for found in images] == [1, 1, 0]  # no image from another origin
            wait.until(
                lambda d: all(
                    d.execute_script("return arguments[0].naturalWidth", i[0]) == 1 for i in images[:2]
                )
            )
            assert _csp_violations(driver) == []
    finally:
        driver.quit()
