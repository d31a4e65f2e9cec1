"""The chat page at / of `gpt2lab serve`, driven end to end in a real headless Chromium (Debian's
`chromium` + `chromium-driver`, through Selenium): a streamed reply equal to the API's own answer,
the conversation kept in the page, the stop button, and a wrong API key said in the page."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
KEY = "page-test-key"
MODEL = "tiny-page-model"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`gpt2lab serve` on a tiny random GPT-2 (BPE, <|endoftext|>, a context of 2048 so a reply lasts long
    enough to be stopped), any free port, with an API key."""
    import torch

    from gpt2lab.hf import save_hf_model
    from gpt2lab.model import GPT, GPTConfig
    from gpt2lab.tokenizer import GPT2Tokenizer

    torch.manual_seed(0)
    model_dir = save_hf_model(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=2048)),
                              tmp_path_factory.mktemp("page") / "tiny", GPT2Tokenizer())
    env = {**os.environ, "GPT2LAB_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gpt2lab", "serve", "--init", str(model_dir), "--port", "0",
                             "--model-name", MODEL,
                             "--max-batch", "4", "--dtype", "fp32"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url, lines = None, []
    deadline = time.monotonic() + 120
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"(http://[\d.]+:\d+)/v1", line)
        url = found and found.group(1)
    assert url, "server did not start:\n" + "".join(lines)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def api(url: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,760", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(predicate, timeout: float = 60.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def set_value(driver, element_id: str, value: str) -> None:
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(value)


def bubbles(driver, role: str):
    return driver.find_elements("css selector", f".msg.{role}")


def say_in_page(driver, text: str) -> None:
    set_value(driver, "input", text)
    driver.find_element("id", "send").click()


def test_page_streams_the_api_answer_and_keeps_the_conversation(server, browser):
    browser.get(server + "/")
    set_value(browser, "api_key", KEY)
    browser.find_element("id", "temperature").click()  # leaves api_key: its change event reloads the model id
    wait_for(lambda: browser.find_element("id", "model").text == MODEL, what="the model id")
    set_value(browser, "temperature", "0")
    set_value(browser, "max_tokens", "12")
    set_value(browser, "system", "You are terse.")

    say_in_page(browser, "Hello there")
    wait_for(lambda: bubbles(browser, "assistant")[-1].get_attribute("data-done"), what="the first reply")
    first = bubbles(browser, "assistant")[-1]
    assert first.get_attribute("data-done") == "finished"
    reply1 = first.find_element("css selector", ".text").get_attribute("textContent")
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]
    expected1 = api(server, "/v1/chat/completions", {"model": MODEL, "messages": messages,
                                                     "temperature": 0, "max_tokens": 12})
    assert reply1 == expected1["choices"][0]["message"]["content"]  # the streamed pieces add up to the API's answer
    assert reply1

    say_in_page(browser, "And then?")  # the second request carries the first exchange
    wait_for(lambda: len(bubbles(browser, "assistant")) == 2
             and bubbles(browser, "assistant")[-1].get_attribute("data-done"), what="the second reply")
    reply2 = bubbles(browser, "assistant")[-1].find_element("css selector", ".text").get_attribute("textContent")
    messages += [{"role": "assistant", "content": expected1["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "And then?"}]
    expected2 = api(server, "/v1/chat/completions", {"model": MODEL, "messages": messages,
                                                     "temperature": 0, "max_tokens": 12})
    assert reply2 == expected2["choices"][0]["message"]["content"]
    assert [b.find_element("css selector", ".text").text for b in bubbles(browser, "user")] == ["Hello there", "And then?"]
    shot = os.environ.get("GPT2LAB_CHAT_SCREENSHOT")
    if shot:
        browser.save_screenshot(shot)


def test_stop_button_ends_the_reply_and_frees_its_row(server, browser):
    browser.get(server + "/")
    set_value(browser, "api_key", KEY)
    browser.find_element("id", "temperature").click()
    wait_for(lambda: browser.find_element("id", "model").text == MODEL, what="the model id")
    set_value(browser, "temperature", "1")
    set_value(browser, "max_tokens", "2000")  # seconds of tokens: long enough to be stopped
    say_in_page(browser, "Tell me a long story")
    wait_for(lambda: browser.find_element("id", "stop").is_enabled(), what="the stop button")
    browser.find_element("id", "stop").click()
    wait_for(lambda: bubbles(browser, "assistant")[-1].get_attribute("data-done"), what="the stopped reply")
    assert bubbles(browser, "assistant")[-1].get_attribute("data-done") == "stopped"
    assert browser.find_element("id", "send").is_enabled()

    def rows_free():
        with urllib.request.urlopen(server + "/metrics", timeout=30) as response:
            text = response.read().decode()
        rows = re.search(r"^gpt2lab_rows_in_use\S*\s+(\S+)$", text, re.M)
        return rows is not None and float(rows.group(1)) == 0
    wait_for(rows_free, what="the cancelled row to be freed")


def test_wrong_api_key_is_said_in_the_page(server, browser):
    browser.get(server + "/")
    set_value(browser, "api_key", "wrong")
    browser.find_element("id", "temperature").click()
    wait_for(lambda: "key" in browser.find_element("id", "model").text.lower(), what="the key error")
    say_in_page(browser, "Hello")
    wait_for(lambda: bubbles(browser, "error"), what="the error message")
    assert "key" in bubbles(browser, "error")[-1].text.lower()


def test_page_needs_nothing_from_the_network():
    page = (Path(__file__).resolve().parents[1] / "src/gpt2lab/serve/static/chat.html").read_text(encoding="utf-8")
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page), "the chat page must load nothing from outside"
