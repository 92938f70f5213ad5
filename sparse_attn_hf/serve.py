"""An OpenAI-compatible endpoint for a patched model behind Transformers' continuous batching (issue 33).

    python -m sparse_attn_hf.serve MODEL [--port 8000] [--host 127.0.0.1] [--profile PATH] [--max-tokens 256]

``MODEL``: a local model folder, or ``default`` for the embedded default model (SmolLM2-135M-Instruct, on the CPU). The
model is patched (its shipped or calibrated profile, or ``--profile``), and one ``ContinuousBatchingManager`` serves
every request: a request arriving while others decode joins the running batch (``batching``). Endpoints:
``GET /v1/models``, ``POST /v1/completions`` (``prompt``: text or token ids) and ``POST /v1/chat/completions``
(``messages``, through the tokenizer's chat template), with ``max_tokens``; ``"stream": true`` sends the answer as
server-sent events while it is decoded (OpenAI's chunks, then ``data: [DONE]``). Greedy decoding only: ``temperature``
above 0 and ``n`` above 1 are refused with a 400 that says so. Loopback by default: the server has no authentication.

Transformers' own ``transformers serve`` cannot load the package (it checks ``--attn-implementation`` against a fixed
list and loads the model in another process).
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class BatchingServer:
    """A patched ``model`` served over HTTP through one continuous-batching manager. ``port`` 0 picks a free port
    (``address`` says which). :meth:`close` stops the manager and the server (their memory is freed)."""

    def __init__(self, model, tokenizer, *, name: str = "model", host: str = "127.0.0.1", port: int = 0,
                 max_tokens: int = 256):
        from transformers import GenerationConfig

        if getattr(model, "_sparse_attn_state", None) is None:
            raise ValueError("BatchingServer serves a patched model: call sparse_attn_hf.patch_model(model) first.")
        self.model, self.tokenizer, self.name, self.max_tokens = model, tokenizer, name, max_tokens
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
        self.eos = eos
        config = GenerationConfig(do_sample=False, max_new_tokens=max_tokens, eos_token_id=eos,
                                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
        self.manager = model.init_continuous_batching(generation_config=config)
        self.manager.start()
        self._waiting: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self._running = True
        self._router = threading.Thread(target=self._route_results, daemon=True)
        self._router.start()
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def generate(self, ids: list[int], max_tokens: int) -> tuple[list[int], str]:
        """Greedy tokens for the prompt ``ids`` (at most ``max_tokens``) and the finish reason ("stop" or "length")."""
        for tokens, finish in self.stream(ids, max_tokens, streaming=False):
            pass
        return tokens, finish

    def stream(self, ids: list[int], max_tokens: int, streaming: bool = True):
        """Yield (the greedy tokens so far, None) as the batch decodes them (``streaming``), then (every token, the
        finish reason: "stop" or "length")."""
        request_id = uuid.uuid4().hex
        waiting: queue.Queue = queue.Queue()
        with self._lock:
            self._waiting[request_id] = waiting
        self.manager.add_request(ids, request_id=request_id, max_new_tokens=max_tokens, eos_token_id=self.eos,
                                 streaming=streaming)
        finished = False
        try:
            while True:
                result = waiting.get()
                if result.error:
                    finished = True
                    raise RuntimeError(f"the request failed in the batch: {result.error}")
                tokens = list(result.generated_tokens)
                if not result.is_finished():
                    yield tokens, None
                    continue
                finished = True
                stopped = bool(tokens) and tokens[-1] == self.eos and len(tokens) <= max_tokens
                yield tokens, "stop" if stopped else "length"
                return
        finally:
            if not finished:  # the reader left (a client that hung up): the batch stops decoding for it
                with self._lock:
                    self._waiting.pop(request_id, None)
                self.manager.cancel_request(request_id)

    def _route_results(self) -> None:
        """Hand each result (a streamed request's partial ones too) to the thread waiting for it (one reader of the
        manager's queue)."""
        while self._running:
            result = self.manager.get_result(timeout=0.1)
            if result is None:
                if not self.manager.is_running():
                    time.sleep(0.1)
                continue
            with self._lock:
                waiting = (self._waiting.pop if result.is_finished() else self._waiting.get)(result.request_id, None)
            if waiting is not None:
                waiting.put(result)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._running = False
        self._router.join()
        self.manager.stop(block=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _handler(server: BatchingServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet: a request log line per call is the client's business
            pass

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (the http.server's name)
            if self.path.rstrip("/") == "/v1/models":
                return self._reply(200, {"object": "list", "data": [{"id": server.name, "object": "model"}]})
            self._reply(404, {"error": {"message": f"no endpoint {self.path}; try /v1/models"}})

        def do_POST(self) -> None:  # noqa: N802
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                chat = self.path.rstrip("/") == "/v1/chat/completions"
                if not chat and self.path.rstrip("/") != "/v1/completions":
                    return self._reply(404, {"error": {"message": f"no endpoint {self.path}"}})
                ids, max_tokens = _request(server, body, chat)
            except (ValueError, KeyError, TypeError) as error:
                return self._reply(400, {"error": {"message": str(error), "type": "invalid_request_error"}})
            if body.get("stream"):
                return self._stream(ids, max_tokens, chat)
            try:
                tokens, finish = server.generate(ids, max_tokens)
            except RuntimeError as error:  # the batch failed this request: the client hears why
                return self._reply(500, {"error": {"message": str(error), "type": "server_error"}})
            text = server.tokenizer.decode(tokens, skip_special_tokens=True)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                      if chat else {"index": 0, "text": text, "finish_reason": finish})
            self._reply(200, {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion" if chat else
                              "text_completion", "created": int(time.time()), "model": server.name,
                              "choices": [choice], "usage": {"prompt_tokens": len(ids), "completion_tokens": len(tokens),
                                                             "total_tokens": len(ids) + len(tokens)}})

        def _stream(self, ids: list[int], max_tokens: int, chat: bool) -> None:
            """Server-sent events: a chunk per step that adds text (held back while it ends inside a character), the
            finish reason in the last, then ``[DONE]``."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            head = {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion.chunk" if chat else
                    "text_completion", "created": int(time.time()), "model": server.name}

            def event(body) -> None:
                self.wfile.write(b"data: " + (body if isinstance(body, bytes) else json.dumps(body).encode()) + b"\n\n")
                self.wfile.flush()

            def send(delta: str | None, finish: str | None) -> None:
                if chat:
                    choice = {"index": 0, "delta": {} if delta is None else {"content": delta},
                              "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": delta or "", "finish_reason": finish}
                event({**head, "choices": [choice]})

            if chat:
                event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]})
            sent, answer = "", server.stream(ids, max_tokens)
            try:
                for tokens, finish in answer:
                    text = server.tokenizer.decode(tokens, skip_special_tokens=True)
                    if finish is None and text.endswith("\ufffd"):  # a character split across tokens: wait for it
                        continue
                    if len(text) > len(sent) and text.startswith(sent):
                        send(text[len(sent):], None)
                        sent = text
                    if finish is not None:
                        send(None, finish)
            except RuntimeError as error:  # the batch failed this request mid-stream: the client hears why
                event({"error": {"message": str(error), "type": "server_error"}})
            except (BrokenPipeError, ConnectionResetError):  # the client hung up: cancel its request
                answer.close()
                return
            event(b"[DONE]")

    return Handler


def _request(server: BatchingServer, body: dict, chat: bool) -> tuple[list[int], int]:
    """(prompt token ids, max new tokens) of a request body; ValueError for what is not served."""
    if float(body.get("temperature", 0) or 0) > 0:
        raise ValueError("only greedy decoding is served: pass temperature 0 (or leave it out).")
    if int(body.get("n", 1)) != 1:
        raise ValueError("one completion per request: leave out n.")
    max_tokens = int(body.get("max_tokens", body.get("max_completion_tokens", server.max_tokens)))
    if not 1 <= max_tokens <= server.max_tokens:
        raise ValueError(f"max_tokens must be between 1 and {server.max_tokens} (the server's --max-tokens).")
    if chat:
        messages = body["messages"]
        text = server.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = server.tokenizer(text, add_special_tokens=False).input_ids
    else:
        prompt = body["prompt"]
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = prompt
        elif isinstance(prompt, str):
            ids = server.tokenizer(prompt, add_special_tokens=False).input_ids
        else:
            raise ValueError("prompt must be a string or a list of token ids (one prompt per request).")
    if not ids:
        raise ValueError("the prompt is empty: pass at least one token.")
    return list(ids), max_tokens


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a local model folder, or 'default' for the embedded default model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--profile", default=None, help="a profile file (default: the model's shipped or calibrated)")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    from .api import patch_model

    if args.model == "default":
        from .default_model import load_default_model

        model, tokenizer = load_default_model()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto", device_map="auto")
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    patch_model(model, args.profile)
    server = BatchingServer(model, tokenizer, name=args.model, host=args.host, port=args.port,
                            max_tokens=args.max_tokens)
    print(f"serving {args.model} at {server.address}/v1 (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()
