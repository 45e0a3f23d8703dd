"""The OpenAI-compatible layer's pure parts: chat templates, stop strings in a stream, which
instance a name picks, and request validation (the wire is tested in tests/e2e/test_serve.py)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from shardplane.api.errors import ApiError
from shardplane.api.openai_compat import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    TextCut,
    decode_request,
    error_body,
    held_back,
    pick_instance,
    render_chat,
)

SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_chatml_template_renders_as_its_jinja_would() -> None:
    text, kind = render_chat(SMOL_TEMPLATE, [ChatMessage("user", "Hi")])
    assert kind == "chatml"
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    own, _ = render_chat(
        SMOL_TEMPLATE, [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")]
    )
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert "SmolLM" not in own


def test_other_templates_fall_back_to_the_plain_one() -> None:
    msgs = [ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello"), ChatMessage("user", "?")]
    text, kind = render_chat("{{ bos_token }}[INST] ...", msgs)
    assert kind == "plain"
    assert text == "user: Hi\nassistant: Hello\nuser: ?\nassistant:"
    assert render_chat(None, msgs) == (text, "plain")


def test_held_back_keeps_what_may_become_a_stop_string() -> None:
    assert held_back("hello wo", ["world"]) == 2
    assert held_back("hello", ["world"]) == 0
    assert held_back("abc\ufffd", []) == 1  # half a UTF-8 character
    assert held_back("x ab", ["abc", "b"]) == 2


def test_text_cut_streams_final_text_and_stops_at_the_first_stop_string() -> None:
    vocab = {1: "Hel", 2: "lo, ", 3: "wor", 4: "ld", 5: "!"}
    cut = TextCut(lambda ids: "".join(vocab[i] for i in ids), ["world"])
    out: list[str] = []
    for token in (1, 2, 3):
        cut.add(token)
        out.append(cut.take())
    assert out == ["Hel", "lo, ", ""]  # "wor" may be the start of "world": held
    cut.add(4)
    assert cut.stopped and cut.take() == ""  # the stop string itself is never sent
    assert "".join(out) == "Hello, " and cut.text == "Hello, "
    open_cut = TextCut(lambda ids: "".join(vocab[i] for i in ids), ["world"])
    open_cut.add(3)
    assert open_cut.take() == "" and open_cut.take(final=True) == "wor"


def _view(ident: str, model: str, state: str = "loaded") -> dict[str, Any]:
    return {"id": ident, "model": model, "state": state, "stage_count": 2, "stages": []}


def test_a_name_picks_the_instance_or_the_least_busy_ready_one() -> None:
    views = [
        _view("a", "smollm2-135m"),
        _view("b", "smollm2-135m"),
        _view("c", "smollm2-135m", "loading"),
    ]
    assert pick_instance(views, "b", Counter())["id"] == "b"
    assert pick_instance(views, "smollm2-135m", Counter({"a": 2, "b": 1}))["id"] == "b"
    with pytest.raises(ApiError) as missing:
        pick_instance(views, "nope", Counter())
    assert missing.value.status == 404 and "a, b, c, smollm2-135m" in missing.value.message
    with pytest.raises(ApiError) as loading:
        pick_instance(views, "c", Counter())
    assert loading.value.status == 503 and "c: loading" in loading.value.message
    with pytest.raises(ApiError) as released:
        pick_instance([_view("r", "smollm2-135m", "released")], "r", Counter())
    assert released.value.status == 404
    with pytest.raises(ApiError) as catalog_only:
        pick_instance([_view("d", "llama-3-70b")], "d", Counter())
    assert catalog_only.value.status == 400


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "prompt": "x", "temperature": 3}, "temperature"),
        ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "m", "prompt": "x", "n": 2}, "n"),
        ({"model": "m", "prompt": "x", "max_token": 5}, "max_token"),
        ({"model": "m", "prompt": ""}, "prompt"),
        ({"model": "m"}, "prompt"),
    ],
)
def test_bad_completion_bodies_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as bad:
        decode_request(json.dumps(body).encode(), CompletionRequest)
    assert bad.value.status == 400 and bad.value.field == param, bad.value.message


def test_chat_bodies_decode_and_roles_are_checked() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    parsed = decode_request(json.dumps(body).encode(), ChatRequest)
    assert parsed.stream and parsed.messages[0].content == "hi" and parsed.max_tokens is None
    body["messages"] = [{"role": "wizard", "content": "hi"}]
    with pytest.raises(ApiError) as bad:
        decode_request(json.dumps(body).encode(), ChatRequest)
    assert bad.value.field == "messages[0].role"


def test_error_body_is_openais_shape() -> None:
    doc = json.loads(error_body(404, "no model", "model", "model_not_found"))
    assert doc == {
        "error": {
            "message": "no model",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert json.loads(error_body(503, "later"))["error"]["type"] == "server_error"


def test_the_openapi_document_lists_the_v1_endpoints() -> None:
    from shardplane.api import openapi

    doc = openapi.document()
    assert "get" in doc["paths"]["/v1/models"]
    for path, schema in (
        ("/v1/completions", "CompletionRequest"),
        ("/v1/chat/completions", "ChatRequest"),
    ):
        post = doc["paths"][path]["post"]
        ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{schema}"
        assert schema in doc["components"]["schemas"]
        assert {"400", "401", "404", "503"} <= set(post["responses"])
