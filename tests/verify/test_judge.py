"""The judge client against a local stub that speaks the OpenAI chat-completions protocol."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from medisee.verify import Scores, Verdict
from medisee.verify.calibrate import CalibratedVerifier, Evidence
from medisee.verify.judge import Judge, JudgeConfig, parse_answer
from medisee.verify.verifier import verify

GOOD = '```json\n{"verdict": "absent", "confidence": 0.8, "evidence": "no organ under the heat"}\n```'


class Stub(BaseHTTPRequestHandler):
    calls: dict = {}
    requests: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        mode = self.path.strip("/").split("/")[0]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Stub.requests.append((self.path, body, self.headers.get("Authorization")))
        Stub.calls[mode] = Stub.calls.get(mode, 0) + 1
        if mode == "slow":
            time.sleep(1.5)
        if mode == "error":
            self.send_response(500)
            self.end_headers()
            return
        content = GOOD
        if mode == "malformed" or (mode == "flaky" and Stub.calls[mode] == 1):
            content = "I think the organ is there, probably."
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass


@pytest.fixture(scope="module")
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def make(stub, mode, **kw):
    return Judge(JudgeConfig(base_url=f"{stub}/{mode}/v1", model="stub-vlm", **kw))


IMAGE = np.full((40, 60, 3), 90, np.uint8)
SIM = np.random.default_rng(0).random((8, 8))
SCORES = Scores(0.6, 0.2, 0.9)


def test_valid_answer_with_images_and_key(stub, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    answer = make(stub, "ok").judge(IMAGE, SIM, SCORES, "Where is the liver?", clip_size=32)
    assert answer.verdict is Verdict.ABSENT and answer.confidence == 0.8
    path, body, auth = Stub.requests[-1]
    assert path == "/ok/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "stub-vlm"
    images = [c for c in body["messages"][1]["content"] if c["type"] == "image_url"]
    assert len(images) == 2 and all(
        c["image_url"]["url"].startswith("data:image/png;base64,") for c in images
    )
    assert "strength=0.600" in body["messages"][1]["content"][0]["text"]


def test_malformed_json_is_retried(stub):
    assert make(stub, "flaky").judge(IMAGE, SIM, SCORES, "q", 32).verdict is Verdict.ABSENT
    assert Stub.calls["flaky"] == 2
    assert make(stub, "malformed", max_attempts=3).judge(IMAGE, SIM, SCORES, "q", 32) is None
    assert Stub.calls["malformed"] == 3


def test_timeout_and_server_error_fall_back(stub):
    assert make(stub, "slow", timeout_s=0.3).judge(IMAGE, SIM, SCORES, "q", 32) is None
    assert make(stub, "error").judge(IMAGE, SIM, SCORES, "q", 32) is None
    fallback = CalibratedVerifier(weights=[0, 0, 0, 5.0, 0, 0], mean=[0] * 6, std=[1] * 6)
    decision = verify(Evidence(SCORES, mask_score=0.9), fallback, make(stub, "error"), IMAGE, SIM, "q", 32)
    assert decision.verdict is Verdict.PRESENT and decision.source == "fallback"


def test_verify_uses_rule_then_judge(stub):
    calibrated = CalibratedVerifier()
    assert verify(Evidence(Scores(0.9, 0.9, 0.9)), calibrated).source == "rule"
    decision = verify(Evidence(SCORES, mask_score=0.9), calibrated, make(stub, "ok"), IMAGE, SIM, "q", 32)
    assert decision.verdict is Verdict.ABSENT and decision.source == "judge"


def test_parse_answer_rejects_bad_fields():
    with pytest.raises(ValueError):
        parse_answer('{"verdict": "maybe", "confidence": 0.5}')
    with pytest.raises(ValueError):
        parse_answer('{"verdict": "present", "confidence": 7}')
    assert parse_answer('{"verdict": "PRESENT"}').verdict is Verdict.PRESENT
