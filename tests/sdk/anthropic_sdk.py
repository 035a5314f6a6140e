"""Drives a Tollgate gateway's Messages API with the official Anthropic Python SDK, as a user
would: only the base URL and the key differ from calling Anthropic. Run by
tests/gateway/sdk.rs, which starts the gateway (with its mock upstream behind an OpenAI-style
provider), reads what this prints (one JSON object) and checks the store behind it.

Environment: TOLLGATE_BASE (http://host:port), TOLLGATE_KEY (a funded account's key),
TOLLGATE_BROKE_KEY (a key of an account with no money).
"""

import json
import os

import anthropic

base = os.environ["TOLLGATE_BASE"]
key = os.environ["TOLLGATE_KEY"]
broke_key = os.environ["TOLLGATE_BROKE_KEY"]
# No retries by the SDK: each call here is one request. The mock upstream answers with the
# words of the last message, over and over, up to max_tokens: 4 words each here.
client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)


def ask(text):
    return [{"role": "user", "content": text}]


seen = {"sdk_version": anthropic.__version__}

raw = client.messages.with_raw_response.create(
    model="gpt-4o-mini",
    max_tokens=4,
    system="You are terse.",
    messages=ask("hello from claude's sdk"),
)
message = raw.parse()
seen["message"] = {
    "id": message.id,
    "role": message.role,
    "model": message.model,
    "content": [block.model_dump() for block in message.content],
    "stop_reason": message.stop_reason,
    "usage": {
        "input_tokens": message.usage.input_tokens,
        "output_tokens": message.usage.output_tokens,
    },
    "request_id": raw.headers.get("x-request-id"),
    "cost": raw.headers.get("x-tollgate-cost"),
}

with client.messages.stream(
    model="gpt-4o-mini",
    max_tokens=4,
    messages=[
        {"role": "user", "content": [{"type": "text", "text": "first question"}]},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": [{"type": "text", "text": "streamed to claude's sdk"}]},
    ],
) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
seen["stream"] = {
    "text": text,
    "final_text": "".join(b.text for b in final.content if b.type == "text"),
    "stop_reason": final.stop_reason,
    "usage": {
        "input_tokens": final.usage.input_tokens,
        "output_tokens": final.usage.output_tokens,
    },
}
seen["events"] = [
    event.type
    for event in client.messages.create(
        model="gpt-4o-mini", max_tokens=2, messages=ask("two words"), stream=True
    )
]


def error_of(call):
    try:
        call()
    except anthropic.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return {
            "class": type(e).__name__,
            "status": e.status_code,
            "type": body.get("type"),
            "error_type": (body.get("error") or {}).get("type"),
            "retry_after": e.response.headers.get("retry-after"),
        }
    return None


def create(model, client=client, messages=ask("x")):
    return lambda: client.messages.create(model=model, max_tokens=4, messages=messages)


stranger = anthropic.Anthropic(base_url=base, api_key="sk-tg-" + "0" * 43, max_retries=0)
broke = anthropic.Anthropic(base_url=base, api_key=broke_key, max_retries=0)
seen["errors"] = {
    "bad_key": error_of(create("gpt-4o-mini", client=stranger)),
    "no_such_model": error_of(create("no-such-model")),
    "no_money": error_of(create("gpt-4o-mini", client=broke)),
    "bad_request": error_of(create("gpt-4o-mini", messages=[{"role": "system", "content": "x"}])),
    "throttled": error_of(create("throttled")),
    "upstream_failed": error_of(create("broken")),
}

print(json.dumps(seen))
