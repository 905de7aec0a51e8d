"""FastAPI app: auth, prefix registry routes, generation routes, /healthz, /metrics."""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import math
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import (AfterValidator, AllowInfNan, BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt,
                      StrictStr, ValidationError)
from starlette.exceptions import HTTPException as StarletteHTTPException
import torch

from .. import __version__
from ..attach import is_seq2seq
from ..methods import MethodConfig, check_used
from ..models import DEFAULT_MODEL
from ..options import check_bounds, check_choices, option
from ..data import Example
from ..config import PrefixConfig
from ..template import encode
from ..train import TrainConfig
from ..train_many import PREFIX_FIELDS, TRAIN_FIELDS
from .metrics import Metrics
from .registry import InvalidPrefix, NotFound, Registry, valid_name
from .scheduler import Job, QueueFull, Scheduler, ShuttingDown
from .training import JobNotFound, Jobs, TooManyJobs, TrainLimits

log = logging.getLogger("prefixtune.serve")

NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
MAX_JSON_BYTES = 4 * 1024 * 1024  # bodies of /v1/generate and /v1/completions
# Sampling below this temperature is greedy decoding: logits / 1e-300 overflow to inf (and NaN
# probabilities), and at 0.01 the distribution is already a point mass in all but exact ties.
MIN_TEMPERATURE = 0.01
MAX_SEED = 2**63 - 1  # torch seeds are 64-bit
MAX_ROWS = 64  # rows (inputs x n) of one request


@dataclass
class ServeConfig:
    """The server's settings; each field is also a ``prefixtune serve`` option (prefixtune/options.py)."""

    model: str = option(DEFAULT_MODEL, f"base model: {DEFAULT_MODEL!r} (embedded) or any Hugging Face id or local directory")
    registry: str = option("./prefix-registry", "directory of the tenants' prefix files (and training jobs)")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on")
    batching: Literal["continuous", "mixed", "single-prefix"] = option(
        "continuous", "continuous: rows join and leave the running batch at every decoding step, whatever their "
        "prefixes (beam search rows, and models it cannot serve, use mixed); mixed: dynamic batches of rows of any "
        "prefixes, each run to its longest row's end; single-prefix: one prefix per batch, as single-active-adapter "
        "serving does (see results/serve.md)")
    max_batch_rows: int = option(32, "rows decoded together (running batch or generate batch); training rows per round")
    batch_wait_ms: float = option(50.0, "mixed/single-prefix: how long a batch waits for more rows once one is queued")
    prefill_chunk: int = option(256, "continuous: prompt tokens prefilled per decoding step (a long prompt takes "
                                "several steps, so newcomers never stall the running rows for long)")
    max_queue: int = option(256, "queued rows before requests get 429")
    max_input_tokens: int = option(1024, "longest input, in prompt tokens (training: prompt + target)")
    max_new_tokens_limit: int = option(256, "largest max_new_tokens a request may ask")
    max_prefixes_in_memory: int = option(64, "LRU bound; evicted prefixes reload from disk")
    max_upload_mb: float = option(64.0, "largest prefix upload")
    request_timeout_s: float = option(120.0, "a request not done by then gets 504")
    threads: int | None = option(None, "torch CPU threads (None: torch's choice)")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "dtype of the frozen base model")
    device: str | None = option(None, "torch device, e.g. cuda (None: cpu)")
    keys: dict[str, str] = field(default_factory=dict)  # API key -> tenant (--keys / PREFIXTUNE_API_KEYS)
    # the training API (prefixtune/serve/training.py)
    train: bool = option(True, "turn the training API off, e.g. on all replicas but one where the shared disk has "
                         "no reliable flock", flag="--no-train")
    train_share: float = option(0.5, "largest share of the time training takes while requests are being served "
                                "(1 = no yielding)")
    max_train_jobs: int = option(2, "queued + running training jobs per tenant")
    max_train_examples: int = option(5000, "examples (train + dev) of one job")
    max_train_steps: int = option(2000, "optimizer steps of one job")
    max_train_prefix_length: int = option(64, "longest prefix a job may train")
    max_train_mb: float = option(16.0, "largest training request body")

    def __post_init__(self):
        """Refuse limits that would crash the server later or turn it silently useless (a queue of 0 rows
        answers every request 429)."""
        check_bounds(self, {"max_batch_rows": 1, "prefill_chunk": 1, "max_queue": 1, "max_input_tokens": 1,
                            "max_new_tokens_limit": 1, "max_prefixes_in_memory": 1, "max_train_jobs": 1,
                            "max_train_examples": 1, "max_train_steps": 1, "max_train_prefix_length": 1, "batch_wait_ms": 0,
                            "port": 0, "threads": 1}, positive=("max_upload_mb", "request_timeout_s", "max_train_mb"))
        if self.port > 65535:
            raise ValueError(f"ServeConfig.port must be a TCP port (0-65535), got {self.port} (--port)")
        check_choices(self)


TRAINING_OPTIONS = ("train", "train_share", "max_train_jobs", "max_train_examples", "max_train_steps",
                    "max_train_prefix_length", "max_train_mb")


def load_keys(path: str | None = None, env: str | None = None) -> dict[str, str]:
    """API key -> tenant, from a JSON file {"key": "tenant"} and/or "key1:tenantA,key2:tenantB"."""
    keys: dict[str, str] = {}
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"keys file not found: {path}")
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and v
                                                 for k, v in data.items()):
            raise ValueError(f"{path}: keys file must be a JSON object {{\"api-key\": \"tenant\", ...}}")
        keys.update(data)
    if env:
        for item in env.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, tenant = item.rpartition(":")
            if not sep or not key or not tenant:
                raise ValueError("PREFIXTUNE_API_KEYS must look like 'key1:tenantA,key2:tenantB'")
            keys[key] = tenant
    return keys


# ---------------------------------------------------------------------------------------------
# Request/response bodies. Every field a client sends is checked here (types, ranges, finite
# numbers, valid Unicode), so nothing malformed reaches the tokenizer or the model.


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON "\ud800" decodes to a lone surrogate, which no tokenizer takes
        raise ValueError(f"not valid Unicode: lone surrogate {text[e.start]!r} at position {e.start}") from None
    return text


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
Finite = Annotated[float, Strict(), AllowInfNan(False)]  # JSON numbers, ints included; 1e400 and NaN refused
PrefixName = Annotated[StrictStr, Field(pattern=NAME_PATTERN)]
Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prefix: PrefixName | None = Field(None, description="prefix name (your tenant's), or null for the base model")
    inputs: list[Text] = Field(..., min_length=1, max_length=MAX_ROWS)
    max_new_tokens: StrictInt = Field(64, ge=1)
    num_beams: StrictInt = Field(1, ge=1, le=16)
    do_sample: StrictBool = False
    temperature: Finite | None = Field(None, gt=0, description=f"below {MIN_TEMPERATURE}: greedy")
    top_p: Finite | None = Field(None, gt=0, le=1)
    seed: Seed | None = None
    stream: StrictBool = Field(False, description="server-sent events {index, text, finish_reason}, then [DONE]")


class TrainExample(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Text = Field(..., max_length=20000)
    target: Text = Field(..., min_length=1, max_length=20000)


class TrainSettings(BaseModel):
    """The settings a tenant may choose (defaults: PrefixConfig's and TrainConfig's); the server's
    limits (--max-train-steps, --max-train-prefix-length) bound them further."""

    model_config = ConfigDict(extra="forbid")
    length: StrictInt = Field(PrefixConfig.length, ge=1, description="prefix positions per layer")
    reparameterize: StrictBool = PrefixConfig.reparameterize
    mlp_hidden: StrictInt = Field(PrefixConfig.mlp_hidden, ge=1, le=4096)
    init: Literal["random", "words"] = PrefixConfig.init
    init_text: Text | None = Field(PrefixConfig.init_text, min_length=1, max_length=2000)
    lr: Finite = Field(TrainConfig.lr, gt=0, le=0.1)
    epochs: Finite = Field(TrainConfig.epochs, gt=0, le=10000)
    max_steps: StrictInt | None = Field(TrainConfig.max_steps, ge=1)
    batch_size: StrictInt = Field(TrainConfig.batch_size, ge=1, le=64)
    warmup_steps: StrictInt = Field(TrainConfig.warmup_steps, ge=0)
    weight_decay: Finite = Field(TrainConfig.weight_decay, ge=0, le=1)
    eval_every: StrictInt = Field(TrainConfig.eval_every, ge=0, description="steps between dev evaluations (0: per epoch)")
    patience: StrictInt = Field(TrainConfig.patience, ge=0, le=1000)
    seed: StrictInt = Field(TrainConfig.seed, ge=0, le=2**31 - 1)


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    examples: list[TrainExample] = Field(..., min_length=1)
    dev: list[TrainExample] = Field(default_factory=list, description="dev examples (dev loss, early stopping)")
    settings: TrainSettings = Field(default_factory=TrainSettings)
    keep_data: StrictBool = Field(False, description="keep the examples on the server after the job ends")


JOB_ID = r"^job-[0-9a-f]{20}$"


class GenerateResponse(BaseModel):
    outputs: list[str]
    prefix: str | None


class PrefixInfo(BaseModel):
    name: str
    length: int
    bytes: int
    created: float


# ---------------------------------------------------------------------------------------------


class Server:
    """Everything the routes share: model, tokenizer(s), registry, scheduler, metrics, limits."""

    def __init__(self, model, tokenizer, config: ServeConfig):
        self.model, self.config = model, config
        self.keys = dict(config.keys)
        self.metrics = Metrics()
        self.registry = Registry(config.registry, model, config.max_prefixes_in_memory)
        self.scheduler = Scheduler(model, tokenizer, self.metrics, config.batching, config.max_batch_rows,
                                   config.batch_wait_ms, config.max_queue, config.prefill_chunk)
        # the worker thread owns `tokenizer`; request threads use their own copy (fast tokenizers are
        # not safe to use from several threads at once)
        self.req_tokenizer = copy.deepcopy(tokenizer)
        self.tok_lock = threading.Lock()
        self.draining = False
        self.jobs = None if not config.train else Jobs(
            config.registry, self.registry, model, tokenizer,
            TrainLimits(jobs_per_tenant=config.max_train_jobs, examples=config.max_train_examples,
                        steps=config.max_train_steps, prefix_length=config.max_train_prefix_length,
                        share=config.train_share, rows_per_round=config.max_batch_rows),
            busy=self.scheduler.busy)
        c = model.config  # decoder-only models with learned positions cannot go past them
        self.max_positions = None if c.is_encoder_decoder else (
            getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None))

    def tenant(self, request: Request) -> str:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        tenant = None
        if scheme.lower() == "bearer" and token:
            for key, t in self.keys.items():  # constant-time compare against every key
                if hmac.compare_digest(key.encode(), token.encode()):
                    tenant = t
        if tenant is None:
            raise HTTPException(401, "missing or unknown API key (send 'Authorization: Bearer KEY')",
                                headers={"WWW-Authenticate": "Bearer"})
        return tenant

    def encode(self, sources: list[str]) -> list[list[int]]:
        """Sources as prefixtune encodes them (decoder-only: x + separator), checked against the limits."""
        prompts = []
        with self.tok_lock:
            for i, s in enumerate(sources):
                try:
                    prompts.append(encode(self.model, self.req_tokenizer, s).prompt)
                except Exception as e:  # valid Unicode the tokenizer still cannot take is the input's fault
                    raise HTTPException(422, f"input {i} could not be tokenised: {e}") from None
        return prompts

    def check_lengths(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        if max_new_tokens > self.config.max_new_tokens_limit:
            raise HTTPException(422, f"max_new_tokens {max_new_tokens} is over the limit of "
                                f"{self.config.max_new_tokens_limit} (--max-new-tokens-limit)")
        limit, positions = self.config.max_input_tokens, self.max_positions
        for i, prompt in enumerate(prompts):
            n = len(prompt)
            if n > limit:
                raise HTTPException(413, f"input {i} is {n} tokens, more than the limit of {limit} (--max-input-tokens)")
            if positions and n + max_new_tokens > positions:
                raise HTTPException(422, f"input {i} is {n} tokens; with {max_new_tokens} new tokens that is more than "
                                    f"the model's {positions} positions")

    # -- training ---------------------------------------------------------------------------------
    @staticmethod
    def parse_training(data: bytes, content_type: str, settings: str | None, keep_data: bool) -> TrainRequest:
        """A training request from a JSON body (TrainRequest), or a JSONL body of examples (one
        ``{"source", "target", "split"?: "train" | "dev"}`` per line) with settings in the query."""
        def invalid(where: str, e: ValidationError):
            return HTTPException(422, [{"loc": [where, *map(str, err["loc"])], "msg": err["msg"], "type": err["type"]}
                                       for err in e.errors(include_url=False)])

        if content_type.split(";")[0].strip() in ("application/jsonl", "application/x-ndjson", "application/json-lines"):
            train, dev = [], []
            for lineno, line in enumerate(data.split(b"\n"), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise HTTPException(422, f"line {lineno}: not valid JSON ({e})") from None
                if not isinstance(row, dict):
                    raise HTTPException(422, f"line {lineno}: expected a JSON object {{\"source\", \"target\"}}")
                split = row.pop("split", "train")
                if split not in ("train", "dev"):
                    raise HTTPException(422, f"line {lineno}: \"split\" must be \"train\" or \"dev\", got {split!r}")
                try:
                    (train if split == "train" else dev).append(TrainExample.model_validate(row))
                except ValidationError as e:
                    raise invalid(f"line {lineno}", e) from None
            try:
                options = TrainSettings.model_validate_json(settings or "{}")
                return TrainRequest(examples=train, dev=dev, settings=options, keep_data=keep_data)
            except ValidationError as e:
                raise invalid("settings" if train else "body", e) from None
        try:
            return TrainRequest.model_validate_json(data)
        except ValidationError as e:
            raise invalid("body", e) from None

    def check_training(self, req: TrainRequest) -> tuple[list[Example], list[Example], PrefixConfig, TrainConfig, int]:
        """The job's data and configs, within the server's limits (4xx naming what is over)."""
        c, s = self.config, req.settings
        n = len(req.examples) + len(req.dev)
        if n > c.max_train_examples:
            raise HTTPException(413, f"{n} examples; the limit is {c.max_train_examples} (--max-train-examples)")
        if s.length > c.max_train_prefix_length:
            raise HTTPException(422, f"settings.length {s.length} is over the limit of {c.max_train_prefix_length} "
                                "(--max-train-prefix-length)")
        if s.patience and not req.dev:
            raise HTTPException(422, "settings.patience stops on the dev loss: send \"dev\" examples too")
        steps = s.max_steps or math.ceil(s.epochs * math.ceil(len(req.examples) / s.batch_size))
        if steps > c.max_train_steps:
            raise HTTPException(422, f"the job would take {steps} optimizer steps; the limit is {c.max_train_steps} "
                                "(--max-train-steps): lower epochs or max_steps, or raise batch_size")
        limit = min(c.max_input_tokens, self.max_positions or c.max_input_tokens)
        with self.tok_lock:
            for where, rows in (("examples", req.examples), ("dev", req.dev)):
                for i, e in enumerate(rows):
                    try:
                        enc = encode(self.model, self.req_tokenizer, e.source, e.target)
                    except Exception as err:
                        raise HTTPException(422, f"{where}[{i}] could not be tokenised: {err}") from None
                    if len(enc.prompt) + len(enc.target) > limit:
                        raise HTTPException(413, f"{where}[{i}] is {len(enc.prompt) + len(enc.target)} tokens; the "
                                            f"limit is {limit} (--max-input-tokens / the model's positions)")
        values = s.model_dump()
        try:  # every TrainSettings field is a PrefixConfig or TrainConfig field (as in a train-many jobs file)
            prefix = PrefixConfig(**{k: v for k, v in values.items() if k in PREFIX_FIELDS})
            train = TrainConfig(**{k: v for k, v in values.items() if k in TRAIN_FIELDS})
            check_used(MethodConfig(), prefix)  # e.g. init_text without init "words": a random start, silently
        except ValueError as e:
            raise HTTPException(422, f"settings: {e}") from None
        return ([Example(e.source, e.target) for e in req.examples], [Example(e.source, e.target) for e in req.dev],
                prefix, train, steps)

    def lookup(self, tenant: str, name: str | None):
        if name is None:
            return None
        try:
            return self.registry.get(tenant, name)
        except NotFound:
            raise HTTPException(404, f"prefix {name!r} not found") from None
        except InvalidPrefix as e:  # the file on disk went bad since it was registered
            raise HTTPException(500, f"prefix {name!r} could not be loaded: {e}") from None

    async def submit(self, tenant: str, name: str | None, prompts: list[list[int]], settings: dict,
                     seed: int | None = None, stop: tuple[str, ...] = (), logprobs: int | None = None,
                     stream: bool = False, ignore_eos: bool = False) -> tuple[Job, asyncio.Queue]:
        """Queue a job; returns it and a queue that receives (row, Delta) per change when ``stream``,
        and ``None`` when the job is done or failed."""
        self.check_lengths(prompts, settings["max_new_tokens"])
        # the prefix object is resolved now and held by the job: deleting it later cannot break the request
        prefix = await run_in_threadpool(self.lookup, tenant, name)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        put = lambda item: loop.call_soon_threadsafe(events.put_nowait, item)  # noqa: E731
        job = Job(tenant=tenant, prefix_name=name, prefix=prefix, prompts=prompts, settings=settings,
                  seed=seed if settings.get("do_sample") else None, stop=stop, logprobs=logprobs, ignore_eos=ignore_eos,
                  on_delta=(lambda i, d: put((i, d))) if stream else None, callbacks=[lambda job: put(None)])
        try:
            self.scheduler.submit(job)
        except QueueFull:
            self.metrics.record_rejected("queue_full")
            raise HTTPException(429, "server busy: the queue is full, retry later",
                                headers={"Retry-After": "1"}) from None
        except ShuttingDown:
            raise HTTPException(503, "server is shutting down") from None
        self.metrics.record_request(tenant, name)
        job.deadline = loop.time() + self.config.request_timeout_s
        return job, events

    def failure(self, job: Job) -> HTTPException:
        # the scheduler isolates failures to the rows that cause them (a failed batch is retried row
        # by row), so this request's own input failed; the traceback is in the server's log
        if isinstance(job.error, torch.OutOfMemoryError):
            return HTTPException(503, "out of memory while generating; retry later", headers={"Retry-After": "5"})
        return HTTPException(422, f"generation failed for this input: {type(job.error).__name__}: {job.error}")

    def timed_out(self, job: Job) -> HTTPException:
        job.cancelled = True
        self.metrics.record_rejected("timeout")
        return HTTPException(504, f"generation did not finish within {self.config.request_timeout_s} s")

    async def wait(self, job: Job, events: asyncio.Queue) -> Job:
        """The finished job (outputs in ``job.streams``), or the HTTP error it ends in."""
        loop = asyncio.get_running_loop()
        try:
            while not job.done.is_set():
                await asyncio.wait_for(events.get(), max(0.0, job.deadline - loop.time()))
        except TimeoutError:
            raise self.timed_out(job) from None
        if job.error is not None:
            raise self.failure(job)
        return job

    async def deltas(self, job: Job, events: asyncio.Queue):
        """Yield (row, Delta) as rows grow; ends when the job is done. A failure or timeout is yielded
        as an HTTPException (the response has started, so it goes into the stream). A client that
        disconnects cancels the job: its queued rows are dropped."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    item = await asyncio.wait_for(events.get(), max(0.0, job.deadline - loop.time()))
                except TimeoutError:
                    yield self.timed_out(job)
                    return
                if item is None:
                    if job.error is not None:
                        yield self.failure(job)
                    return
                yield item
        finally:
            if not job.done.is_set():
                job.cancelled = True


def prefix_from_peft_zip(data: bytes, model, allow_position_shift: bool, limit: int) -> bytes:
    """A PEFT prefix-tuning checkpoint (a zip holding adapter_config.json and
    adapter_model.safetensors, at its top or in one folder) as the bytes of our prefix file, converted
    by prefixtune/peft_io.py; HTTPException 4xx naming what is wrong. Only those two members are
    read (never a pickle), each at most ``limit`` bytes uncompressed."""
    import io
    import shutil
    import tempfile
    import zipfile

    from ..peft_io import CONFIG_FILE, WEIGHTS_FILE, from_peft

    tmp = tempfile.mkdtemp(prefix="prefixtune-peft-")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = {Path(i.filename).name: i for i in archive.infolist() if not i.is_dir()}
        missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if f not in members]
        if missing:
            pickle_note = " (adapter_model.bin is a pickle, which is never loaded: save with safe_serialization=True)" \
                if "adapter_model.bin" in members else ""
            raise HTTPException(422, f"the zip has no {' and no '.join(missing)}{pickle_note}")
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            if members[f].file_size > limit:
                raise HTTPException(413, f"{f} is {members[f].file_size} bytes uncompressed, over the upload limit")
            (Path(tmp) / f).write_bytes(archive.read(members[f]))
        prefix = from_peft(tmp, model, allow_position_shift)
        prefix.meta["peft_source"] = "upload"
        return prefix.save(Path(tmp) / "prefix.safetensors").read_bytes()
    except (zipfile.BadZipFile, ValueError, OSError, KeyError, RuntimeError, EOFError) as e:
        raise HTTPException(422, "not a usable PEFT prefix-tuning checkpoint: " + str(e).replace(tmp, "upload")) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tenant(request: Request) -> str:
    return request.app.state.server.tenant(request)


Tenant = Annotated[str, Depends(_tenant)]
Name = Annotated[str, PathParam(pattern=NAME_PATTERN, description="[A-Za-z0-9._-]{1,64}")]


def generation_settings(max_new_tokens, num_beams, do_sample, temperature, top_p) -> dict:
    if temperature is not None and temperature < MIN_TEMPERATURE:
        do_sample = False  # documented floor: see MIN_TEMPERATURE
    s = {"max_new_tokens": int(max_new_tokens), "num_beams": int(num_beams), "do_sample": bool(do_sample)}
    if do_sample:
        s["temperature"] = float(temperature if temperature is not None else 1.0)
        s["top_p"] = float(top_p if top_p is not None else 1.0)
    return s


def error_body(status: int, detail) -> dict:
    """``detail`` for prefixtune's clients, ``error`` in OpenAI's shape for OpenAI's clients."""
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    message = detail if isinstance(detail, str) else json.dumps(detail, ensure_ascii=True, default=repr)
    return {"detail": detail, "error": {"message": message, "type": kind, "param": None, "code": status}}


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=True, default=repr)


def _error(status: int, detail, headers=None) -> Response:
    return Response(_json(error_body(status, detail)), status_code=status, headers=headers, media_type="application/json")


def sse(events) -> StreamingResponse:
    """Server-sent events: each dict from the async iterator ``events`` as one ``data:`` line, then [DONE]."""
    async def lines():
        async for event in events:
            yield f"data: {_json(event)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(model, tokenizer, config: ServeConfig) -> FastAPI:
    srv = Server(model, tokenizer, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        srv.scheduler.start()
        if srv.jobs is not None:
            srv.jobs.start()
        log.info("serving %s: %d tenant(s), %d prefix(es) registered, %s batching", config.model,
                 len(set(srv.keys.values())), srv.registry.stats()["registered"], srv.scheduler.batching)
        yield
        # uvicorn has stopped accepting and finished in-flight requests; drain whatever is queued
        srv.draining = True
        if srv.jobs is not None:  # after its current round; jobs keep their checkpoints and resume at restart
            await run_in_threadpool(srv.jobs.stop)
        await run_in_threadpool(srv.scheduler.stop)
        log.info("scheduler drained; bye")

    from .openai import openai_routes  # its routes use this module's helpers

    app = FastAPI(title="prefixtune serve", version=__version__, lifespan=lifespan,
                  description="Many tenants' prefixes, one frozen base model, mixed-prefix batching.")
    app.state.server = srv

    # The rule: nothing a client sends gets a 5xx. Input is checked by the request models (422 with
    # pydantic's reasons) and the routes (4xx); a failing row fails only its own request (422, see
    # run_job). Error bodies are written as ASCII JSON, since a client's NaN or lone surrogate
    # quoted in a message must not make the error response itself fail. Anything else is a
    # server fault: logged with its traceback, 500.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return _error(422, [{"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
                             "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in exc.errors()])

    @app.exception_handler(Exception)
    async def server_fault(request: Request, exc: Exception):
        log.error("server fault on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal server error ({type(exc).__name__}); it is in the server's log")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if srv.draining and request.url.path != "/metrics":
            return _error(503, "server is shutting down")
        if request.method == "POST" and not request.url.path.endswith("/train"):  # (training: --max-train-mb)
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > MAX_JSON_BYTES:
                return _error(413, f"request body over {MAX_JSON_BYTES} bytes")
        return await call_next(request)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "model": config.model, "batching": srv.scheduler.batching,
                "queue_depth": srv.scheduler.depth(), "version": __version__}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics():
        srv.metrics.queue_depth = srv.scheduler.depth()
        return PlainTextResponse(srv.metrics.render(srv.registry.stats()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def read_body(request: Request, limit: int, flag: str) -> bytes:
        """The request's body, refused with 413 as soon as it is over ``limit`` bytes."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise HTTPException(413, f"body is {int(length)} bytes, over the limit of {limit} ({flag})")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"body over the limit of {limit} bytes ({flag})")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.put("/v1/prefixes/{name}", status_code=201, response_model=PrefixInfo)
    async def put_prefix(name: Name, request: Request, tenant: Tenant, allow_position_shift: bool = False):
        """The bytes of an exported prefix file; or (Content-Type application/zip) a PEFT
        prefix-tuning checkpoint: a zip of adapter_config.json and adapter_model.safetensors."""
        if not valid_name(name):
            raise HTTPException(422, f"invalid prefix name {name!r}: use 1-64 of [A-Za-z0-9._-]")
        if name == "base":
            raise HTTPException(422, "the name 'base' is reserved: it is the base model in /v1/completions and chat")
        limit = int(config.max_upload_mb * 1024 * 1024)
        data = await read_body(request, limit, "--max-upload-mb")
        if not data:
            raise HTTPException(422, "empty body: send the bytes of an exported prefix .safetensors file")
        if request.headers.get("content-type", "").split(";")[0].strip() in ("application/zip", "application/x-zip-compressed"):
            data = await run_in_threadpool(prefix_from_peft_zip, data, model, allow_position_shift, limit)
        try:
            entry, created = await run_in_threadpool(srv.registry.put, tenant, name, data)
        except InvalidPrefix as e:
            raise HTTPException(422, f"not a usable prefix for this model: {e}") from None
        info = PrefixInfo(name=entry.name, length=entry.length, bytes=entry.bytes, created=entry.created)
        return JSONResponse(info.model_dump(), status_code=201 if created else 200)

    @app.get("/v1/prefixes")
    def list_prefixes(tenant: Tenant):
        return {"prefixes": [PrefixInfo(name=e.name, length=e.length, bytes=e.bytes, created=e.created).model_dump()
                             for e in srv.registry.list(tenant)]}

    @app.delete("/v1/prefixes/{name}")
    def delete_prefix(name: Name, tenant: Tenant):
        try:
            srv.registry.delete(tenant, name)
        except NotFound:
            raise HTTPException(404, f"prefix {name!r} not found") from None
        return {"deleted": name}

    def jobs() -> Jobs:
        if srv.jobs is None:
            raise HTTPException(403, "training is turned off on this server (prefixtune serve --no-train)")
        return srv.jobs

    @app.post("/v1/prefixes/{name}/train", status_code=202)
    async def train_prefix(name: Name, request: Request, tenant: Tenant, settings: str | None = None,
                           keep_data: bool = False):
        """Train a prefix on the tenant's examples; when the job succeeds, the prefix is registered
        as ``name`` (as an upload would be). JSON body: TrainRequest. JSONL body
        (Content-Type application/jsonl): one example per line, settings as ``?settings={...}``."""
        store = jobs()
        if name == "base":
            raise HTTPException(422, "the name 'base' is reserved: it is the base model in /v1/completions and chat")
        if is_seq2seq(model):
            raise HTTPException(422, f"training through the server needs a decoder-only model; {type(model).__name__} "
                                "is an encoder-decoder model (train with `prefixtune train` and upload the prefix)")
        data = await read_body(request, int(config.max_train_mb * 1024 * 1024), "--max-train-mb")
        req = srv.parse_training(data, request.headers.get("content-type", "application/json"), settings, keep_data)
        train, dev, prefix, train_config, steps = await run_in_threadpool(srv.check_training, req)
        try:
            record = await run_in_threadpool(store.create, tenant, name, train, dev, prefix, train_config,
                                             req.keep_data, steps)
        except TooManyJobs as e:
            raise HTTPException(429, str(e), headers={"Retry-After": "60"}) from None
        return JSONResponse(record, status_code=202)

    @app.get("/v1/jobs")
    def list_jobs(tenant: Tenant):
        return {"jobs": jobs().list(tenant)}

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: Annotated[str, PathParam(pattern=JOB_ID)], tenant: Tenant):
        try:
            return jobs().get(tenant, job_id)
        except JobNotFound:
            raise HTTPException(404, f"training job {job_id!r} not found") from None

    @app.delete("/v1/jobs/{job_id}")
    def delete_job(job_id: Annotated[str, PathParam(pattern=JOB_ID)], tenant: Tenant):
        """Cancel a queued or running job (it ends as "cancelled" within a round); the record of an
        ended job is deleted."""
        try:
            return jobs().cancel(tenant, job_id)
        except JobNotFound:
            raise HTTPException(404, f"training job {job_id!r} not found") from None

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate_route(body: GenerateRequest, tenant: Tenant):
        if body.stream and body.num_beams > 1:
            raise HTTPException(422, "stream=true needs num_beams=1")
        settings = generation_settings(body.max_new_tokens, body.num_beams, body.do_sample, body.temperature, body.top_p)
        prompts = await run_in_threadpool(srv.encode, list(body.inputs))
        job, events = await srv.submit(tenant, body.prefix, prompts, settings, body.seed, stream=body.stream)
        if not body.stream:
            await srv.wait(job, events)
            return {"outputs": [s.text for s in job.streams], "prefix": body.prefix}

        async def chunks():
            async for item in srv.deltas(job, events):
                if isinstance(item, HTTPException):
                    yield error_body(item.status_code, item.detail)
                    return
                i, delta = item
                yield {"index": i, "text": delta.text, "finish_reason": delta.finish_reason}

        return sse(chunks())

    openai_routes(app, srv)
    return app


def check_address(host: str, port: int) -> None:
    """Refuse an address the server could not listen on (a port in use, a host not of this machine)
    before the model loads, which can take minutes; uvicorn itself would find out only after it."""
    import socket

    if port == 0:  # any free port: nothing to check
        return
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
                s.bind(address)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e} (--host, --port)") from None


def serve(config: ServeConfig) -> int:
    """Load the model, build the app and run uvicorn until SIGTERM/SIGINT (then drain and exit)."""
    import torch
    import uvicorn

    from ..models import load_base_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not config.keys:
        raise ValueError("no API keys: give --keys FILE or set PREFIXTUNE_API_KEYS='key1:tenantA,...'")
    check_address(config.host, config.port)
    if config.threads:
        torch.set_num_threads(config.threads)
    model, tokenizer = load_base_model(config.model, dtype=getattr(torch, config.dtype), device=config.device)
    app = create_app(model, tokenizer, config)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):  # new requests get 503 from now on; in-flight ones finish
            app.state.server.draining = True
            super().handle_exit(sig, frame)

    server = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                           timeout_graceful_shutdown=None))
    server.run()
    return 0
