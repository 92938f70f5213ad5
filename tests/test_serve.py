"""``python -m sparse_attn_hf.serve``: the default model behind continuous batching, reached through a real HTTP client
on loopback; every answer is the patched model's own greedy ``generate()`` of the same prompt."""

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("transformers.generation.continuous_batching")

from sparse_attn_hf import patched  # noqa: E402
from sparse_attn_hf.serve import BatchingServer  # noqa: E402


def _events(url: str, body: dict) -> list:
    """A streamed request's server-sent events, in order (``[DONE]`` as the string)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        lines = [line.decode().rstrip("\n") for line in response]
    return [line[len("data: "):] if line == "data: [DONE]" else json.loads(line[len("data: "):])
            for line in lines if line.startswith("data: ")]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@torch.no_grad()
def test_concurrent_requests_get_what_generate_gives(default_model):
    model, tokenizer = default_model
    prompts = [("The capital of France is", 6), ("def fibonacci(n):", 9), ("Once upon a time, in a small village,", 4)]
    with patched(model):
        server = BatchingServer(model, tokenizer, name="default", max_tokens=16)
        try:
            url = server.address + "/v1"
            with urllib.request.urlopen(url + "/models", timeout=30) as response:
                assert json.loads(response.read())["data"][0]["id"] == "default"
            answers = [None] * len(prompts)

            def ask(i):  # the requests arrive together and join one batch
                answers[i] = _post(url + "/completions", {"prompt": prompts[i][0], "max_tokens": prompts[i][1]})

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            chat = _post(url + "/chat/completions", {"messages": [{"role": "user", "content": "Say hello."}],
                                                     "max_tokens": 5})
            refused = _post(url + "/completions", {"prompt": "Hi", "temperature": 0.7})
            streamed = _events(url + "/completions", {"prompt": prompts[1][0], "max_tokens": prompts[1][1],
                                                      "stream": True})
            streamed_chat = _events(url + "/chat/completions", {"messages": [{"role": "user", "content": "Say hello."}],
                                                                "max_tokens": 5, "stream": True})
        finally:
            server.close()
        for (prompt, limit), (status, body) in zip(prompts, answers):
            assert status == 200, body
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
            alone = model.generate(ids, max_new_tokens=limit, do_sample=False, eos_token_id=server.eos,
                                   pad_token_id=server.eos)[0, ids.shape[1]:]
            assert body["choices"][0]["text"] == tokenizer.decode(alone, skip_special_tokens=True)
            assert body["usage"]["completion_tokens"] == len(alone) <= limit
    assert chat[0] == 200 and chat[1]["choices"][0]["message"]["role"] == "assistant"
    assert refused[0] == 400 and "greedy" in refused[1]["error"]["message"]
    # streamed: the chunks add up to the same answer, the last names why it ended, then [DONE]
    assert streamed[-1] == "[DONE]" and len(streamed) > 3  # a chunk per step, not one at the end
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == answers[1][1]["choices"][0]["text"]
    assert streamed[-2]["choices"][0]["finish_reason"] == answers[1][1]["choices"][0]["finish_reason"]
    assert streamed_chat[0]["choices"][0]["delta"]["role"] == "assistant" and streamed_chat[-1] == "[DONE]"
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in streamed_chat[:-1])
    assert content == chat[1]["choices"][0]["message"]["content"]
    assert streamed_chat[-2]["choices"][0]["finish_reason"] == chat[1]["choices"][0]["finish_reason"]


@torch.no_grad()
def test_a_client_that_hangs_up_mid_stream_is_cancelled(default_model):
    """A streamed request whose client disconnects is cancelled in the batch (it stops decoding for nobody), and
    the server goes on serving."""
    import socket
    import time

    model, tokenizer = default_model
    with patched(model):
        server = BatchingServer(model, tokenizer, name="default", max_tokens=200)
        server.eos = -1  # no early end: the request is still decoding when its client leaves
        cancelled = []
        cancel = server.manager.cancel_request
        server.manager.cancel_request = lambda request_id: (cancelled.append(request_id), cancel(request_id))
        try:
            host, port = server.httpd.server_address[:2]
            body = json.dumps({"prompt": "Once upon a time", "max_tokens": 200, "stream": True}).encode()
            with socket.create_connection((host, port), timeout=120) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body)
                seen = b""
                while seen.count(b"data: ") < 2:  # decoding has begun
                    chunk = sock.recv(4096)
                    assert chunk, f"the server closed the stream early: {seen!r}"
                    seen += chunk
            deadline = time.time() + 120
            while not cancelled and time.time() < deadline:
                time.sleep(0.05)
            assert len(cancelled) == 1 and not server._waiting
            status, answer = _post(server.address + "/v1/completions", {"prompt": "Hi", "max_tokens": 3})
            assert status == 200 and answer["usage"]["completion_tokens"] == 3
        finally:
            server.close()
