"""Drives a Tollgate gateway with the official OpenAI Python SDK, as a user would: only the
base URL and the key differ from calling OpenAI. Run by tests/gateway/sdk.rs, which starts
the gateway, reads what this prints (one JSON object) and checks the store behind it.

Environment: TOLLGATE_BASE (http://host:port), TOLLGATE_KEY (a funded account's key),
TOLLGATE_BROKE_KEY (a key of an account with no money).
"""

import json
import os

import openai
from openai import OpenAI

base = os.environ["TOLLGATE_BASE"] + "/v1"
key = os.environ["TOLLGATE_KEY"]
broke_key = os.environ["TOLLGATE_BROKE_KEY"]
# No retries by the SDK: each call here is one request, so the test can count them. The
# gateway's mock upstream answers with the words of the last message, over and over, up to
# max_tokens: 4 words each here.
client = OpenAI(base_url=base, api_key=key, max_retries=0)


def ask(text):
    return [{"role": "user", "content": text}]


seen = {"sdk_version": openai.__version__}

seen["models"] = sorted(m.id for m in client.models.list())
model = client.models.retrieve("gpt-4o-mini")
seen["retrieved"] = {
    "id": model.id,
    "owned_by": model.owned_by,
    "pricing": (model.model_extra or {}).get("pricing"),
}

raw = client.chat.completions.with_raw_response.create(
    model="gpt-4o-mini", messages=ask("hello from the sdk"), max_tokens=4
)
completion = raw.parse()
seen["chat"] = {
    "content": completion.choices[0].message.content,
    "finish_reason": completion.choices[0].finish_reason,
    "prompt_tokens": completion.usage.prompt_tokens,
    "completion_tokens": completion.usage.completion_tokens,
    "request_id": raw.headers.get("x-request-id"),
    "cost": raw.headers.get("x-tollgate-cost"),
}


def read(stream):
    content, usage, chunks = [], [], 0
    for chunk in stream:
        chunks += 1
        if chunk.choices and chunk.choices[0].delta.content:
            content.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage.append(
                {
                    "prompt_tokens": chunk.usage.prompt_tokens,
                    "completion_tokens": chunk.usage.completion_tokens,
                }
            )
    return {"content": "".join(content), "usage": usage, "chunks": chunks}


seen["stream"] = read(
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=ask("streamed through the sdk"),
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
)
seen["stream_without_usage"] = read(
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=ask("no usage asked for"),
        max_tokens=4,
        stream=True,
    )
)


def error_of(call):
    try:
        call()
    except openai.APIStatusError as e:
        return {
            "class": type(e).__name__,
            "status": e.status_code,
            "code": e.code,
            "type": e.type,
            "message": e.message,
            "retry_after": e.response.headers.get("retry-after"),
        }
    return None


def chat(model, client=client, messages=ask("x")):
    return lambda: client.chat.completions.create(model=model, messages=messages)


stranger = OpenAI(base_url=base, api_key="sk-tg-" + "0" * 43, max_retries=0)
broke = OpenAI(base_url=base, api_key=broke_key, max_retries=0)
seen["errors"] = {
    "bad_key": error_of(lambda: stranger.models.list()),
    "no_such_model": error_of(chat("no-such-model")),
    "retrieve_missing": error_of(lambda: client.models.retrieve("no-such-model")),
    "no_money": error_of(chat("gpt-4o-mini", client=broke)),
    "bad_request": error_of(chat("gpt-4o-mini", messages="not a list")),
    "throttled": error_of(chat("throttled")),
    "upstream_failed": error_of(chat("broken")),
}

print(json.dumps(seen))
