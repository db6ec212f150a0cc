"""Served, as users deploy it: `vllm serve <export>` (the vLLM CPU venv) on 127.0.0.1, a free port.

Text and image+text chat completions through the OpenAI-compatible API, then lmms-eval's OpenAI-compatible
model adapter runs vlmq's local image task against the same endpoint. The test starts and stops the server
itself; the start, every request and the harness run are bounded in time. Only loopback traffic.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from test_harness import demo_export
from vlmq.calib import demo_coco_root
from vlmq.evaluate import harness

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 60
HARNESS_TIMEOUT_S = 300
SERVED_NAME = "vlmq-demo-w8a8"
HARNESS_LIMIT = 3


@dataclass
class Server:
    base_url: str
    proc: subprocess.Popen
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, payload: dict | None = None, timeout: float = REQUEST_TIMEOUT_S) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # loopback: never through a proxy
    with opener.open(req, timeout=timeout) as resp:
        body = resp.read()
    return json.loads(body) if body else {}


def wait_healthy(server: Server, deadline_s: float) -> None:
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        if server.proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.proc.returncode}:\n{server.log.read_text()[-4000:]}",
                        pytrace=False)
        try:
            http_json(f"{server.base_url}/health", timeout=5)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            time.sleep(2)
    pytest.fail(f"vllm serve not healthy after {deadline_s} s:\n{server.log.read_text()[-4000:]}", pytrace=False)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (its engine core and worker), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    export = demo_export() / "compressed_tensors"
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "vllm_serve.log"
    cmd = [str(vllm_python), "-m", "vllm.entrypoints.cli.main", "serve", str(export), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", SERVED_NAME, "--dtype", "auto", "--max-model-len", "2048",
           "--enforce-eager", "--limit-mm-per-prompt", '{"image": 1}']
    env = {**harness.clean_env(), "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1"}
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_healthy(srv, START_TIMEOUT_S)
        yield srv
    finally:
        stop(proc)


def chat(server: Server, content) -> dict:
    return http_json(f"{server.base_url}/v1/chat/completions",
                     {"model": SERVED_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
                      "temperature": 0})


def test_text_and_image_chat_completions(server: Server):
    models = http_json(f"{server.base_url}/v1/models")
    assert [m["id"] for m in models["data"]] == [SERVED_NAME], models
    text = chat(server, "Describe a cat.")
    image = sorted((demo_coco_root() / "val2017").glob("*.jpg"))[0]
    url = "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode()
    pictured = chat(server, [{"type": "image_url", "image_url": {"url": url}},
                             {"type": "text", "text": "Describe a cat."}])
    for reply in (text, pictured):
        assert isinstance(reply["choices"][0]["message"]["content"], str), reply
        assert 1 <= reply["usage"]["completion_tokens"] <= 8, reply
    # The same words with the picture: its vision tokens reached the model.
    assert pictured["usage"]["prompt_tokens"] > text["usage"]["prompt_tokens"] + 4, (text["usage"], pictured["usage"])
    assert "CompressedTensorsW8A8Int8" in server.log.read_text()   # vLLM runs the export's int8 kernels


def test_lmms_eval_openai_adapter_runs_the_local_task_against_the_server(server: Server, tmp_path: Path):
    python = harness.harness_python()
    assert python is not None, f"no harness venv: run {harness.INSTALL}"
    h = harness.HARNESSES["lmms_eval"]
    args = f"model={SERVED_NAME},base_url={server.base_url}/v1,api_key=EMPTY,timeout={REQUEST_TIMEOUT_S}," \
           "max_retries=1,num_concurrent=2,httpx_trust_env=False"
    cmd = [str(python), "-m", h.module, "--model", "openai", "--model_args", args, "--tasks", "vlmq_demo_caption",
           "--include_path", str(h.tasks_dir), "--limit", str(HARNESS_LIMIT), "--batch_size", "1",
           "--output_path", str(tmp_path), "--log_samples"]
    env = {**harness.run_env("cpu", offline=True), "OPENAI_API_KEY": "EMPTY"}
    served_before = server.log.read_text().count("POST /v1/chat/completions")
    proc = subprocess.run(cmd, cwd=h.tasks_dir, env=env, capture_output=True, text=True, timeout=HARNESS_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    raw = harness.read_results(tmp_path)
    assert raw is not None and raw["n-samples"]["vlmq_demo_caption"]["effective"] == HARNESS_LIMIT, raw
    scores = harness.task_scores(raw)["vlmq_demo_caption"]
    assert set(scores) == {"caption_f1", "exact_match"} and all(0 <= v <= 1 for v in scores.values())
    served = server.log.read_text().count("POST /v1/chat/completions") - served_before
    assert served == HARNESS_LIMIT, served   # every sample went through the endpoint
