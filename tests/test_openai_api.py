"""The OpenAI-compatible API on a real uvicorn process, driven with the official `openai` client:
tokens equal /generate's for the same request (greedy and seeded, base model and adapter), n
choices, streaming, stop, include_usage, logprobs, /v1/models per tenant, and OpenAI's errors (400s
naming unsupported fields, 404 unknown model, 401, 429 with Retry-After)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from safetensors.torch import save

from server.tenancy.keys import add_key
from tests.live_server import live_server

MAX_MODEL_LEN = 128
MAX_N = 4
QUESTION = [{"role": "user", "content": "Tell me a story about a cat."}]


def _lora(seed: int) -> tuple[bytes, bytes]:
    """A rank-4 LoRA on q_proj and v_proj of the tiny served model (hidden 64, two layers, kv 2x16)."""
    gen = torch.Generator().manual_seed(seed)
    prefix, tensors = "base_model.model.model.layers.", {}
    for layer in range(2):
        for name, out in (("q_proj", 64), ("v_proj", 32)):
            tensors[f"{prefix}{layer}.self_attn.{name}.lora_A.weight"] = torch.randn(4, 64, generator=gen) * 0.5
            tensors[f"{prefix}{layer}.self_attn.{name}.lora_B.weight"] = torch.randn(out, 4, generator=gen) * 0.5
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    return json.dumps(config).encode(), save(tensors)


@pytest.fixture(scope="module")
def server(tiny_served_model_dir, tmp_path_factory):
    """A server with keys: tenants acme and beta (users), ops (admin), capped (one request at a time).
    acme owns the adapter `tone`; beta owns `shared` (made public) and `secret`."""
    root = tmp_path_factory.mktemp("openai")
    keys = {tenant: add_key(root / "keys.json", tenant, role) for tenant, role in [
        ("acme", "user"), ("beta", "user"), ("ops", "admin"), ("capped", "user")
    ]}  # fmt: skip
    (root / "limits.json").write_text(json.dumps({"capped": {"max_running": 1, "max_queued": 0}}))
    flags = ["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-gb", "0.1", "--max-num-seqs", "8"]
    flags += [
        "--max-n",
        str(MAX_N),
        "--api-keys",
        str(root / "keys.json"),
        "--tenant-limits",
        str(root / "limits.json"),
    ]
    with live_server(tiny_served_model_dir, root / "adapters", *flags) as url:
        for owner, adapter_id, seed in [("acme", "tone", 1), ("beta", "shared", 2), ("beta", "secret", 3)]:
            config, weights = _lora(seed)
            r = httpx.post(
                f"{url}/adapters",
                headers={"Authorization": f"Bearer {keys[owner]}"},
                data={"adapter_id": adapter_id},
                files={"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)},
                timeout=60,
            )
            assert r.status_code == 201, r.text
        r = httpx.patch(
            f"{url}/adapters/beta/shared", headers={"Authorization": f"Bearer {keys['ops']}"}, json={"public": True}
        )
        assert r.status_code == 200, r.text
        yield url, keys, httpx.get(f"{url}/health").json()["model"]


def _client(server, tenant: str = "acme") -> openai.OpenAI:
    url, keys, _ = server
    # organization/project: the SDK then sends OpenAI-Organization / OpenAI-Project headers, tolerated.
    return openai.OpenAI(
        base_url=f"{url}/v1", api_key=keys[tenant], max_retries=0, organization="org-x", project="proj-x"
    )


def _generate(server, tenant: str = "acme", **body) -> dict:
    url, keys, _ = server
    r = httpx.post(f"{url}/generate", headers={"Authorization": f"Bearer {keys[tenant]}"}, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_models_lists_base_and_what_the_caller_may_use(server):
    _, _, base = server
    acme = {m.id: m for m in _client(server, "acme").models.list()}
    assert set(acme) == {base, "tone", "beta/shared"}
    assert acme["tone"].owned_by == "acme" and acme["beta/shared"].owned_by == "beta"
    assert acme[base].object == "model" and acme[base].created > 0
    beta = {m.id for m in _client(server, "beta").models.list()}
    assert beta == {base, "shared", "secret"}
    assert _client(server, "acme").models.retrieve("beta/shared").owned_by == "beta"
    with pytest.raises(openai.NotFoundError):
        _client(server, "acme").models.retrieve("beta/secret")


@pytest.mark.parametrize("model", ["base", "tone"])
def test_completion_greedy_equals_generate_with_logprobs(server, model):
    _, _, base = server
    adapter = None if model == "base" else model
    got = _client(server).completions.create(
        model=base if adapter is None else adapter, prompt="Once upon a time", max_tokens=12, temperature=0, logprobs=3
    )
    want = _generate(server, prompt="Once upon a time", max_tokens=12, adapter_id=adapter, logprobs=3)
    [choice] = got.choices
    assert choice.text == want["text"] and choice.finish_reason == want["finish_reason"]
    assert got.usage.completion_tokens == len(want["token_ids"]) == len(choice.logprobs.tokens)
    assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert choice.logprobs.token_logprobs == [lp["logprob"] for lp in want["logprobs"]]
    for chosen, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
        assert len(top) <= 3 and max(top.values()) == chosen  # greedy: the chosen token is the best
    assert choice.logprobs.text_offset[0] == 0


def test_adapter_changes_the_answer(server):
    _, _, base = server
    logprob = {}
    for model in (base, "tone"):
        got = _client(server).completions.create(
            model=model, prompt="Hello there, friend", max_tokens=1, temperature=0, logprobs=0
        )
        logprob[model] = got.choices[0].logprobs.token_logprobs[0]
    assert abs(logprob[base] - logprob["tone"]) > 1e-3


def test_chat_seeded_choices_equal_generate_with_seed_plus_index(server):
    """Choice i of a request with seed s samples like a /generate request with seed s + i."""
    got = _client(server, "acme").chat.completions.create(
        model="beta/shared", messages=QUESTION, max_tokens=10, temperature=0.9, top_p=0.95, seed=11, n=3, user="u-1"
    )
    texts = [c.message.content for c in sorted(got.choices, key=lambda c: c.index)]
    for i, text in enumerate(texts):
        want = _generate(
            server, messages=QUESTION, max_tokens=10, temperature=0.9, top_p=0.95, seed=11 + i, adapter_id="beta/shared"
        )
        assert text == want["text"]
    assert len(set(texts)) > 1, "choices with different seeds should differ"
    assert all(c.message.role == "assistant" for c in got.choices)
    again = _client(server, "acme").chat.completions.create(
        model="beta/shared", messages=QUESTION, max_tokens=10, temperature=0.9, top_p=0.95, seed=11, n=3
    )
    assert [c.message.content for c in sorted(again.choices, key=lambda c: c.index)] == texts


def test_chat_stream_equals_the_whole_answer_and_ends_with_usage(server):
    _, _, base = server
    kwargs = dict(model=base, messages=QUESTION, max_tokens=12, temperature=0.8, seed=5, n=2)
    whole = _client(server).chat.completions.create(**kwargs)
    chunks = list(
        _client(server).chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    text, finish, roles = ["", ""], [None, None], [None, None]
    for chunk in chunks[:-1]:
        assert chunk.object == "chat.completion.chunk" and chunk.usage is None
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
            roles[c.index] = roles[c.index] or c.delta.role
            finish[c.index] = c.finish_reason or finish[c.index]
    assert roles == ["assistant", "assistant"]
    ordered = sorted(whole.choices, key=lambda c: c.index)
    assert text == [c.message.content for c in ordered]
    assert finish == [c.finish_reason for c in ordered]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({chunk.id for chunk in chunks}) == 1


def test_completion_stream_with_logprobs_equals_the_whole_answer(server):
    _, _, base = server
    kwargs = dict(model=base, prompt="The weather today", max_tokens=8, temperature=0.7, seed=3, logprobs=2)
    whole = _client(server).completions.create(**kwargs).choices[0]
    tokens, logprobs, text = [], [], ""
    for chunk in _client(server).completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                logprobs += c.logprobs.token_logprobs
    assert text == whole.text
    assert tokens == whole.logprobs.tokens and logprobs == whole.logprobs.token_logprobs


def test_chat_logprobs_shape(server):
    got = _client(server).chat.completions.create(
        model="tone", messages=QUESTION, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and values[0] == entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token and entry.bytes == list(entry.token.encode())
    only_chosen = _client(server).chat.completions.create(
        model="tone", messages=QUESTION, max_tokens=6, temperature=0, logprobs=True
    )
    assert [e.logprob for e in only_chosen.choices[0].logprobs.content] == [e.logprob for e in content]
    assert all(e.top_logprobs == [] for e in only_chosen.choices[0].logprobs.content)


def test_generate_logprobs_json_and_sse_agree(server):
    url, keys, _ = server
    body = {"prompt": "Count: one, two", "max_tokens": 6, "temperature": 0.5, "seed": 9, "logprobs": 2}
    whole = _generate(server, **body)
    assert len(whole["logprobs"]) == len(whole["token_ids"])
    assert [lp["token_id"] for lp in whole["logprobs"]] == whole["token_ids"]
    assert all(len(lp["top_logprobs"]) == 2 for lp in whole["logprobs"])
    r = httpx.post(
        f"{url}/generate", headers={"Authorization": f"Bearer {keys['acme']}"}, json={**body, "stream": True}
    )
    events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
    assert [lp for e in events for lp in e["logprobs"]] == whole["logprobs"]
    assert "logprobs" not in _generate(server, prompt="Hi", max_tokens=2)


def test_stop_ends_before_the_stop_string(server):
    _, _, base = server
    free = _client(server).completions.create(model=base, prompt="Once upon a time", max_tokens=20, temperature=0)
    text = free.choices[0].text
    start = next(i for i in range(len(text) // 2, len(text)) if not text[i].isspace())
    stop = text[start : start + 3]
    got = _client(server).completions.create(
        model=base, prompt="Once upon a time", max_tokens=20, temperature=0, stop=[stop, "zzzz"]
    )
    assert got.choices[0].text == text[: text.index(stop)] and got.choices[0].finish_reason == "stop"


def test_noop_defaults_are_accepted(server):
    _, _, base = server
    chat = _client(server).chat.completions.create(
        model=base,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        max_completion_tokens=2,
        frequency_penalty=0,
        presence_penalty=0.0,
        logit_bias={},
        response_format={"type": "text"},
        parallel_tool_calls=True,
        store=False,
    )
    assert chat.choices[0].finish_reason in ("stop", "length")
    completion = _client(server).completions.create(
        model=base, prompt=[[1, 2, 3]], max_tokens=2, best_of=1, echo=False, suffix=None, logit_bias=None
    )
    assert completion.usage.prompt_tokens == 3


CHAT_REFUSALS = [
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": 1}, "presence_penalty"),
    ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"extra_body": {"mirostat": 2, "top_k": 5}}, "mirostat, top_k"),
    ({"n": MAX_N + 1}, "n"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"max_completion_tokens": 10_000}, "max_completion_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, "messages"),
]


@pytest.mark.parametrize("kwargs,param", CHAT_REFUSALS, ids=[p for _, p in CHAT_REFUSALS])
def test_chat_refusals_are_400_naming_the_field(server, kwargs, param):
    _, _, base = server
    with pytest.raises(openai.BadRequestError) as caught:
        _client(server).chat.completions.create(**{"model": base, "messages": QUESTION, **kwargs})
    error = caught.value.body
    assert error["type"] == "invalid_request_error" and error["param"].startswith(param), error
    if error["code"] == "unsupported_parameter":
        assert all(name.split("[")[0] in error["message"] for name in error["param"].split(", ")), error


COMPLETION_REFUSALS = [
    ({"best_of": 2}, "best_of"),
    ({"echo": True}, "echo"),
    ({"suffix": "end"}, "suffix"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
]


@pytest.mark.parametrize("kwargs,param", COMPLETION_REFUSALS, ids=[p for _, p in COMPLETION_REFUSALS])
def test_completion_refusals_are_400_naming_the_field(server, kwargs, param):
    _, _, base = server
    with pytest.raises(openai.BadRequestError) as caught:
        _client(server).completions.create(**{"model": base, "prompt": "hi", "max_tokens": 2, **kwargs})
    assert caught.value.body["param"] == param, caught.value.body


def test_unknown_model_is_404_and_private_adapters_stay_private(server):
    for model in ("no-such-model", "beta/secret"):
        with pytest.raises(openai.NotFoundError) as caught:
            _client(server, "acme").chat.completions.create(model=model, messages=QUESTION, max_tokens=2)
        assert caught.value.body == {
            "message": f"the model {model!r} does not exist or you do not have access to it",
            "type": "not_found_error",
            "param": "model",
            "code": "model_not_found",
        }


def test_bad_key_is_401_and_limits_are_429_with_retry_after(server):
    url, _, base = server
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert caught.value.body["type"] == "authentication_error"
    with pytest.raises(openai.RateLimitError) as caught:  # capped may hold one request; n=2 asks for two
        _client(server, "capped").completions.create(model=base, prompt="hi", max_tokens=2, n=2)
    assert caught.value.body["type"] == "rate_limit_error" and caught.value.response.headers["retry-after"] == "1"


def test_malformed_bodies_are_400_in_openai_shape(server):
    url, keys, _ = server
    auth = {"Authorization": f"Bearer {keys['acme']}", "content-type": "application/json"}
    for content, param in [
        (b"{not json", None),
        (b'{"prompt": "hi"}', "model"),
        (b'{"model": "m", "prompt": 5}', "prompt"),
    ]:
        r = httpx.post(f"{url}/v1/completions", content=content, headers=auth)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
        assert error["type"] == "invalid_request_error"
    # /generate keeps its own envelope and statuses
    r = httpx.post(f"{url}/generate", content=b'{"prompt": 5}', headers=auth)
    assert r.status_code == 422 and set(r.json()["error"]) == {"message", "type"}


def test_refusals_before_routing_use_the_openai_shape_too(server):
    """The cross-site write guard and the body cap answer before any route runs; on /v1 they still
    speak OpenAI's envelope."""
    url, keys, base = server
    auth = {"Authorization": f"Bearer {keys['acme']}"}
    body = {"model": base, "messages": QUESTION, "max_tokens": 1}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={**auth, "origin": "http://evil.example"})
    assert r.status_code == 403
    assert r.json()["error"] == {**r.json()["error"], "type": "permission_error", "code": "cross_origin_refused"}
    r = httpx.post(f"{url}/v1/completions", json={"model": base, "prompt": "x" * 5 * 2**20}, headers=auth)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["code"] == "request_too_large"


def test_a_choice_failing_mid_stream_ends_it_with_an_openai_error_event():
    """What the SDK raises as an APIError: an `error` event in OpenAI's shape, and no [DONE]."""
    import asyncio

    from server.api.openai_format import ChatFormat
    from server.api.openai_routes import _stream
    from server.engine.request import GenerationError, TokenEvent

    async def events():
        yield 0, TokenEvent("r0", [5], "Hi")
        yield 1, TokenEvent("r1", [6], "", "error", error=GenerationError("non_finite_output", "overflowed"))

    async def lines() -> list[str]:
        return [line async for line in _stream(ChatFormat("chatcmpl-1", "m", None, 2, False), events())]

    sent = [json.loads(line.removeprefix("data: ")) for line in asyncio.run(lines())]
    assert [c["choices"][0]["delta"] for c in sent[:3]] == [{"role": "assistant", "content": ""}] * 2 + [
        {"content": "Hi"}
    ]
    assert sent[3] == {
        "error": {"message": "overflowed", "type": "invalid_request_error", "param": None, "code": "non_finite_output"}
    }
    assert len(sent) == 4
