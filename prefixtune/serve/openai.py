"""OpenAI-shaped routes: /v1/completions, /v1/chat/completions, /v1/models.

``model`` names one of the caller's prefixes, or ``"base"`` for the base model. Completions
encode the prompt the way prefixtune trains (``x`` + separator, as in ``/v1/generate``); chat
renders the messages with the tokenizer's chat template and applies the prefix as usual.
Differences from OpenAI, all refused rather than ignored where they would change the output:
``temperature`` absent or below 0.01 is greedy (OpenAI's default is 1); penalties and
``logit_bias`` only at their neutral values; ``echo``, ``suffix``, ``best_of``, tools and images
are not supported. ``usage`` counts the tokens actually generated (a final EOS included), and
prompt tokens once per prompt whatever ``n``.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from fastapi import FastAPI, HTTPException
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from .app import MAX_ROWS, Finite, Name, PrefixName, Seed, Server, Tenant, Text, generation_settings, error_body, sse
from .output import Delta

MAX_LOGPROBS = 5  # alternatives per token
MAX_STOP = 8  # stop sequences per request


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Common(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")
    model: PrefixName = Field(..., description='prefix name, or "base" for the base model')
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Finite | None = Field(None, ge=0, description="absent or below 0.01: greedy")
    top_p: Finite | None = Field(None, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, le=MAX_ROWS)
    seed: Seed | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = Field(None, description=f"up to {MAX_STOP} sequences")
    min_tokens: StrictInt = Field(0, ge=0, description="EOS cannot end the text before this many tokens (vLLM's extension)")
    ignore_eos: StrictBool = Field(False, description="EOS does not end the text: exactly max_tokens (vLLM's extension)")
    user: Text | None = None  # accepted, not used
    # accepted only at their neutral values: anything else would silently change the output
    frequency_penalty: Finite | None = None
    presence_penalty: Finite | None = None
    logit_bias: dict[str, Finite] | None = None

    @model_validator(mode="after")
    def _supported(self):
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0):
                raise ValueError(f"{name} is not supported (only 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported (only empty)")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return self

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Common):
    prompt: Text | list[Text]
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    suffix: None = None
    best_of: StrictInt | None = None

    @model_validator(mode="after")
    def _completion_supported(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of is not supported (only equal to n)")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def as_template_input(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Common):
    messages: list[Message] = Field(..., min_length=1, max_length=256)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)


def _chat_prompt(srv: Server, messages: list[Message]) -> list[int]:
    tok = srv.req_tokenizer
    if srv.model.config.is_encoder_decoder or not getattr(tok, "chat_template", None):
        raise HTTPException(422, "the served model's tokenizer has no chat template; use /v1/completions")
    with srv.tok_lock:
        try:
            text = tok.apply_chat_template([m.as_template_input() for m in messages], add_generation_prompt=True,
                                           tokenize=False)
            return tok(text, add_special_tokens=False).input_ids
        except Exception as e:  # templates raise on what they do not accept (e.g. the order of roles)
            raise HTTPException(422, f"the chat template cannot render these messages: {e}") from None


def _usage(prompts: list[list[int]], job) -> dict:
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(s.tokens) for s in job.streams)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(entries: list, k: int) -> dict:
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [dict(top) for _, _, top in entries] if k else None}


def _chat_logprobs(entries: list) -> dict:
    def item(token, logprob):
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}

    return {"content": [dict(item(t, lp), top_logprobs=[item(a, v) for a, v in top]) for t, lp, top in entries],
            "refusal": None}


def openai_routes(app: FastAPI, srv: Server) -> None:
    async def run(tenant: str, body: _Common, prompts: list[list[int]], max_tokens: int, logprobs: int | None,
                  choice, chunk_choice, first_chunks, kind: str):
        """Submit ``n`` rows per prompt (prompt-major, as OpenAI numbers choices) and answer in one body
        or as a stream; ``choice``/``chunk_choice`` shape one choice from a row's stream / delta."""
        rows = [p for p in prompts for _ in range(body.n)]
        if len(rows) > MAX_ROWS:
            raise HTTPException(422, f"{len(prompts)} prompts x n={body.n} is over {MAX_ROWS} completions per request")
        name = None if body.model == "base" else body.model
        if body.min_tokens > max_tokens:
            raise HTTPException(422, f"min_tokens {body.min_tokens} is more than max_tokens {max_tokens}")
        settings = generation_settings(max_tokens, 1, bool(body.temperature), body.temperature, body.top_p)
        if body.min_tokens:
            settings["min_new_tokens"] = body.min_tokens
        job, events = await srv.submit(tenant, name, rows, settings, body.seed, body.stops(), logprobs, body.stream,
                                       body.ignore_eos)
        head = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
                "object": kind, "created": int(time.time()), "model": body.model}
        if not body.stream:
            await srv.wait(job, events)
            return dict(head, choices=[choice(i, s) for i, s in enumerate(job.streams)], usage=_usage(prompts, job))

        if kind == "chat.completion":
            head["object"] = "chat.completion.chunk"

        async def chunks():
            for c in first_chunks(len(rows)):
                yield dict(head, choices=[c])
            async for item in srv.deltas(job, events):
                if isinstance(item, HTTPException):
                    yield error_body(item.status_code, item.detail)
                    return
                yield dict(head, choices=[chunk_choice(*item)])
            if body.stream_options and body.stream_options.include_usage:
                yield dict(head, choices=[], usage=_usage(prompts, job))

        return sse(chunks())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, tenant: Tenant):
        texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not 1 <= len(texts) <= MAX_ROWS:
            raise HTTPException(422, f"prompt must be a string or a list of 1 to {MAX_ROWS} strings")
        prompts = await run_in_threadpool(srv.encode, texts)
        k = body.logprobs

        def choice(i, stream):
            lp = None if k is None else _completion_logprobs(stream.logprobs, k)
            return {"text": stream.text, "index": i, "logprobs": lp, "finish_reason": stream.finish_reason}

        def chunk_choice(i, delta: Delta):
            lp = None if k is None else _completion_logprobs(delta.logprobs, k)
            return {"text": delta.text, "index": i, "logprobs": lp, "finish_reason": delta.finish_reason}

        return await run(tenant, body, prompts, body.max_tokens or 16, k, choice, chunk_choice, lambda n: [],
                         "text_completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, tenant: Tenant):
        prompt = await run_in_threadpool(_chat_prompt, srv, body.messages)
        k = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens or srv.config.max_new_tokens_limit

        def choice(i, stream):
            return {"index": i, "message": {"role": "assistant", "content": stream.text},
                    "logprobs": None if k is None else _chat_logprobs(stream.logprobs),
                    "finish_reason": stream.finish_reason}

        def chunk_choice(i, delta: Delta):
            return {"index": i, "delta": {"content": delta.text} if delta.text else {},
                    "logprobs": None if k is None else _chat_logprobs(delta.logprobs),
                    "finish_reason": delta.finish_reason}

        def first_chunks(n):  # OpenAI's streams open each choice with the role
            return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(n)]

        return await run(tenant, body, [prompt], max_tokens, k, choice, chunk_choice, first_chunks, "chat.completion")

    def model_card(name: str, created: float, owner: str) -> dict:
        return {"id": name, "object": "model", "created": int(created), "owned_by": owner}

    @app.get("/v1/models")
    def list_models(tenant: Tenant):
        return {"object": "list", "data": [model_card("base", srv.metrics.started, "prefixtune")]
                + [model_card(e.name, e.created, tenant) for e in srv.registry.list(tenant)]}

    @app.get("/v1/models/{model}")
    def get_model(model: Name, tenant: Tenant):
        if model == "base":
            return model_card("base", srv.metrics.started, "prefixtune")
        entry = next((e for e in srv.registry.list(tenant) if e.name == model), None)
        if entry is None:
            raise HTTPException(404, f"model {model!r} not found")
        return model_card(entry.name, entry.created, tenant)
