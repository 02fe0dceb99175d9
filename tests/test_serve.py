"""mslora serve: a real LitServe server in a subprocess on localhost, answering as mslora.predict does, for
concurrent requests to different adapters (batched together), with clear 400s; and its page in headless Chromium."""
import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import mslora
from mslora.cli import main

pytest.importorskip("litserve", reason="mslora serve needs the serve extra (pip install -e '.[serve]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(two_runs, tmp_path_factory):
    """``mslora serve`` of both runs (max batch 8, 50 ms batch timeout); its base URL."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")
    cmd = [sys.executable, "-m", "mslora.cli", "serve", "--port", str(port), "--device", "cpu", "--max-batch-size",
           "8", "--batch-timeout", "0.05", "--adapter", *[f"{n}={run}" for n, (run, _) in two_runs.items()]]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):  # up to 2 minutes to import, spawn the worker and load the models
            if proc.poll() is not None:
                break
            try:
                if urllib.request.urlopen(url + "/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        if proc.poll() is not None or urllib.request.urlopen(url + "/health", timeout=5).read() != b"ok":
            log.seek(0)
            pytest.fail(f"mslora serve did not come up:\n{log.read()[-3000:]}")
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/predict", json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_concurrent_requests_to_different_adapters_answer_as_predict(server, two_runs):
    adapters = json.loads(urllib.request.urlopen(server + "/adapters").read())
    assert {n: a["classes"] for n, a in adapters.items()} == {"rgb": ["blue", "green", "red"], "rg": ["green", "red"]}
    assert all(a["task"] == "classify" for a in adapters.values())
    jobs = [(name, path) for name, (_, paths) in two_runs.items() for path in paths[::3]]
    jobs = [jobs[i] for i in np.random.default_rng(0).permutation(len(jobs))]  # interleaved adapters
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda j: post(server, {"adapter": j[0], "image": base64.b64encode(
            j[1].read_bytes()).decode()}), jobs))
    for name, (run, _) in two_runs.items():
        rows = [i for i, (n, _) in enumerate(jobs) if n == name]
        ref = mslora.predict(mslora.load_run(run, device="cpu"), [jobs[i][1] for i in rows])
        for i, r in zip(rows, ref):
            status, out = answers[i]
            assert status == 200 and out["adapter"] == name and out["label"] == r["label"]
            assert np.allclose(out["probabilities"], r["probabilities"], atol=1e-5)
            assert out["top_k"][0]["label"] == r["label"]


def test_bad_requests_get_400_with_the_reason(server, two_runs):
    image = base64.b64encode(two_runs["rg"][1][0].read_bytes()).decode()
    assert post(server, {"adapter": "nope", "image": image}) == (
        400, {"detail": "adapter 'nope' is not served; choose one of: rgb, rg"})
    status, out = post(server, {"adapter": "rg"})
    assert status == 400 and "no 'image'" in out["detail"]
    status, out = post(server, {"adapter": "rg", "image": base64.b64encode(b"not a picture").decode()})
    assert status == 400 and "not an image file" in out["detail"]
    assert post(server, {"adapter": "rg", "image": image})[0] == 200  # the server goes on


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None or shutil.which("chromedriver") is None,
                    reason="Debian's chromium and chromium-driver are not installed (apt-get install chromium "
                           "chromium-driver)")
def test_the_page_uploads_an_image_and_shows_the_answer(server, two_runs, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        driver.get(server + "/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        Select(driver.find_element(By.ID, "adapter")).select_by_value("rg")
        assert "adapter on test_resnet" in driver.find_element(By.ID, "adapter-info").text
        image = two_runs["rg"][1][0]
        driver.find_element(By.ID, "image").send_keys(str(image))
        driver.find_element(By.ID, "submit").click()
        label = WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.ID, "label"))[0].text
        expected = mslora.predict(two_runs["rg"][0], [image])[0]
        assert label == expected["label"]
        rows = driver.find_elements(By.CSS_SELECTOR, "#top-k tr")
        assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows] == sorted(
            ["green", "red"], key=lambda c: -expected["probabilities"][["green", "red"].index(c)])
        driver.save_screenshot(str(tmp_path / "page.png"))
        if os.environ.get("MSLORA_SCREENSHOT"):
            shutil.copy(tmp_path / "page.png", os.environ["MSLORA_SCREENSHOT"])
    finally:
        driver.quit()


def test_detection_and_segmentation_answers_are_json_with_drawn_images():
    from mslora.tools.serve import encode  # imports LitServe

    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    det = {"boxes": torch.tensor([[1.0, 2.0, 10.0, 12.0], [0.0, 0.0, 5.0, 5.0]]), "scores": torch.tensor([0.9, 0.2]),
           "labels": ["cat", "dog"], "masks": torch.zeros(2, 20, 30, dtype=torch.bool)}
    out = encode("detect", ["cat", "dog"], image, det, 5, 0.5, draw=True)
    assert out["boxes"] == [[1.0, 2.0, 10.0, 12.0]] and out["labels"] == ["cat"] and out["scores"] == [
        pytest.approx(0.9)]
    assert Image.open(io.BytesIO(base64.b64decode(out["image_png"]))).size == (30, 20)
    label_map = torch.zeros(20, 30, dtype=torch.long)
    label_map[5:, :] = 2
    out = encode("segment", ["bg", "a", "b"], image, {"label_map": label_map}, 5, 0.5, draw=False)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["label_map_png"]))))
    assert out["classes_present"] == ["bg", "b"] and (decoded == label_map.numpy()).all() and "image_png" not in out
    json.dumps(out)


def test_the_cli_says_what_is_wrong_with_an_adapter_argument(tmp_path, capsys):
    assert main(["serve", "--adapter", "no-equals-sign"]) == 2
    assert "--adapter 'no-equals-sign' must be NAME=RUN" in capsys.readouterr().err
    assert main(["serve", "--adapter", f"a={tmp_path / 'missing'}"]) == 2
    assert "missing" in capsys.readouterr().err
