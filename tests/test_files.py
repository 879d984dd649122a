"""OpenAI's Files API on llmq (``/v1/files``): the official SDK unchanged, input files checked line by line as
they are stored (a bad one stores nothing), the size cut off whatever the headers say, and each file its
tenant's."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import httpx
import openai
import psycopg
import pytest
import redis.asyncio as aioredis

from llmq.pipeline.config import load_config
from llmq.pipeline.db import make_pool, migrate
from llmq.pipeline.filestore import CHUNK
from llmq.pipeline.keys import Keys
from llmq.pipeline.runtime.ops_server import OpsServer
from llmq.stages.ingest import create_app
from tests.support.clients import QUEUEING


@contextlib.asynccontextmanager
async def served(
    redis: aioredis.Redis, keys: Keys, database_url: str | None, env: dict[str, str] | None = None
) -> AsyncIterator[str]:
    """The ingest API on a real port (as `llmq-stage run ingest`), with its PostgreSQL pool when given one."""
    base = {"LLMQ_KEY_PREFIX": keys.prefix, **QUEUEING}
    if database_url:
        await migrate(database_url)
        base["LLMQ_DATABASE_URL"] = database_url
    config = load_config(None, env={**base, **(env or {})})
    pool = make_pool(config.database.postgres) if config.database.postgres else None
    server = OpsServer(create_app(config, redis=redis, keys=keys, pool=pool), host="127.0.0.1", port=0, lifespan=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()


def line(custom_id: str, content: str = "Hello", url: str = "/v1/chat/completions", **body: object) -> str:
    request = {"model": "m", "messages": [{"role": "user", "content": content}]} | body
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": request})


def jsonl(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


OPENAI_EXAMPLE = jsonl(
    # the two lines of OpenAI's own Batch API guide, as given there
    '{"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": '
    '"gpt-3.5-turbo-0125", "messages": [{"role": "system", "content": "You are a helpful assistant."},{"role": '
    '"user", "content": "Hello world!"}],"max_tokens": 1000}}',
    '{"custom_id": "request-2", "method": "POST", "url": "/v1/chat/completions", "body": {"model": '
    '"gpt-3.5-turbo-0125", "messages": [{"role": "system", "content": "You are an unhelpful assistant."},{"role": '
    '"user", "content": "Hello world!"}],"max_tokens": 1000}}',
)


async def _stored(database_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        files = (await (await conn.execute("SELECT count(*) FROM files")).fetchone() or (0,))[0]
        chunks = (await (await conn.execute("SELECT count(*) FROM file_chunks")).fetchone() or (0,))[0]
    return int(files) + int(chunks)


async def test_the_openai_sdk_uploads_reads_lists_and_deletes_a_batch_file(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    async with served(redis, keys, database_url) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        # When OpenAI's own example input is uploaded as its guide does it
        created = await client.files.create(file=("batchinput.jsonl", OPENAI_EXAMPLE), purpose="batch")
        # Then it is described as OpenAI describes it, and reads back byte for byte
        assert created.id.startswith("file-") and created.object == "file" and created.purpose == "batch"
        assert created.bytes == len(OPENAI_EXAMPLE) and created.filename == "batchinput.jsonl"
        assert created.status == "processed"
        assert (await client.files.retrieve(created.id)).bytes == len(OPENAI_EXAMPLE)
        assert (await client.files.content(created.id)).content == OPENAI_EXAMPLE
        # and it is listed, newest first, page by page
        second = await client.files.create(file=("b.jsonl", jsonl(line("x"))), purpose="batch")
        listed = await client.files.list()
        assert [f.id for f in listed.data] == [second.id, created.id]
        page = await client.files.list(limit=1)
        assert [f.id for f in page.data] == [second.id] and page.has_more
        after = await client.files.list(limit=1, after=second.id)
        assert [f.id for f in after.data] == [created.id] and not after.has_more
        # When it is deleted, it is gone
        deleted = await client.files.delete(created.id)
        assert deleted.deleted and deleted.id == created.id
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            await client.files.content(created.id)


async def test_a_file_of_many_chunks_reads_back_whole(redis: aioredis.Redis, keys: Keys, database_url: str) -> None:
    # Given a file of 3.5 chunks, its lines cut by the chunk boundaries
    pad = "x" * 1000
    body = jsonl(*(line(f"r{i}", pad) for i in range(int(3.5 * CHUNK / 1100))))
    async with served(redis, keys, database_url) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        created = await http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("big.jsonl", body)})
        assert created.status_code == 200, created.text
        fid = created.json()["id"]
        # Then it is kept in 4 chunks and reads back whole (its length declared), its lines counted
        content = await http.get(f"/v1/files/{fid}/content")
    assert content.content == body and content.headers["content-length"] == str(len(body))
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        row = await (await conn.execute("SELECT chunks, lines, urls FROM files WHERE id = %s", (fid,))).fetchone()
    assert row == (4, body.count(b"\n"), ["/v1/chat/completions"])


@pytest.mark.parametrize(
    ("lines", "status", "message", "param"),
    [
        ((*(line(f"r{i}") for i in range(17)), "{not json"), 422, "line 18: malformed JSON", None),
        ((line("a"), line("b"), line("a")), 422, "line 3: duplicate custom_id 'a' (first on line 1)", "custom_id"),
        ((line("a", url="/v1/images"),), 422, "line 1: url must be one of", "url"),
        (
            (line("a"), json.dumps({"custom_id": "b", "method": "GET", "url": "/v1/embeddings", "body": {}})),
            422,
            "line 2: method must be POST",
            "method",
        ),
        (
            (json.dumps({"custom_id": 7, "method": "POST", "url": "/v1/embeddings", "body": {}}),),
            422,
            "line 1: Expected `str`, got `int`",
            "custom_id",
        ),
        ((line("a", model=None),), 422, "line 1: body.model must name a model", "body.model"),
        ((line("a", stream=True),), 422, "line 1: a batch's requests are not streamed", "body.stream"),
        ((line("a", url="/v1/embeddings"),), 422, "line 1: body.input is required for embeddings", "body.input"),
        ((line("a", messages=[]),), 422, "line 1: body.messages must be a non-empty array", "body.messages"),
        (("", "  "), 422, "the file holds no request", None),
        ((line("a"), line("b"), line("c"), line("d")), 422, "line 4: the file holds more than 3 requests", None),
        ((line("a", "y" * 3000),), 422, "line 1: the line is over 2048 bytes", None),
        ((line("a\x00b"),), 422, "line 1: custom_id must not hold a NUL character", "custom_id"),
    ],
)
async def test_a_bad_input_file_is_refused_naming_the_line_and_field_and_nothing_is_stored(
    redis: aioredis.Redis,
    keys: Keys,
    database_url: str,
    lines: tuple[str, ...],
    status: int,
    message: str,
    param: str | None,
) -> None:
    env = {"LLMQ_BATCHES__MAX_LINES": "3", "LLMQ_SERVER__MAX_BODY_BYTES": "2048"}
    # (the 18-line case needs more lines: its limit is raised)
    if len(lines) > 4:
        env["LLMQ_BATCHES__MAX_LINES"] = "50"
    async with served(redis, keys, database_url, env) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:
            await client.files.create(file=("in.jsonl", jsonl(*lines)), purpose="batch")
    assert refused.value.status_code == status
    error = refused.value.body
    assert isinstance(error, dict) and message in error["message"] and error["param"] == param, error
    assert await _stored(database_url) == 0


async def test_an_upload_is_cut_off_at_the_size_limit_whatever_its_headers_say(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    env = {"LLMQ_BATCHES__MAX_FILE_BYTES": "100000"}
    big = jsonl(*(line(f"r{i}") for i in range(2000)))  # about 200 kB
    async with served(redis, keys, database_url, env) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        # a declared length past the limit is refused before the body is read
        declared = await http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("big.jsonl", big)})
        assert declared.status_code == 413 and declared.json()["error"]["param"] == "file"
        # and so is a body sent in chunks, with no length declared
        boundary = "llmqboundary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()

        async def chunked() -> AsyncIterator[bytes]:
            yield head
            for i in range(0, len(big), 8192):
                yield big[i : i + 8192]
            yield f"\r\n--{boundary}--\r\n".encode()

        streamed = await http.post(
            "/v1/files", content=chunked(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        assert streamed.status_code == 413, streamed.text
        # and what is not multipart, or names another purpose, is refused naming why
        wrong_type = await http.post("/v1/files", json={"purpose": "batch"})
        assert wrong_type.status_code == 415
        wrong_purpose = await http.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("a", b"{}")})
        assert wrong_purpose.status_code == 422 and wrong_purpose.json()["error"]["param"] == "purpose"
        garbled = await http.post(
            "/v1/files", content=b"--x\r\nnonsense", headers={"Content-Type": "multipart/form-data"}
        )
        assert garbled.status_code == 400 and "multipart" in garbled.json()["error"]["message"], garbled.text
        no_file = await http.post("/v1/files", data={"purpose": "batch"}, files={"other": ("a", b"{}")})
        assert no_file.status_code == 422 and no_file.json()["error"]["param"] == "file"
    assert await _stored(database_url) == 0


async def test_a_file_is_its_tenants_and_an_operators(redis: aioredis.Redis, keys: Keys, database_url: str) -> None:
    # Given two tenants' keys and an operator's
    env = {"LLMQ_API_KEYS": "k-ops", "LLMQ_TENANTS": "[{name: a, api_keys: [k-a]}, {name: b, api_keys: [k-b]}]"}
    async with served(redis, keys, database_url, env) as url:
        as_a = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k-a", max_retries=0)
        as_b = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k-b", max_retries=0)
        ops = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k-ops", max_retries=0)
        nobody = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k-wrong", max_retries=0)
        # When tenant a uploads a file
        mine = await as_a.files.create(file=("a.jsonl", jsonl(line("x"))), purpose="batch")
        # Then tenant b neither sees, reads nor deletes it; a and the operator do
        for call in (as_b.files.retrieve, as_b.files.content, as_b.files.delete):
            with pytest.raises(openai.NotFoundError):
                await call(mine.id)
        assert [f.id for f in (await as_b.files.list()).data] == []
        assert [f.id for f in (await as_a.files.list()).data] == [mine.id]
        assert [f.id for f in (await ops.files.list()).data] == [mine.id]
        assert (await ops.files.retrieve(mine.id)).id == mine.id
        with pytest.raises(openai.AuthenticationError):
            await nobody.files.list()
        # and a tenant's key cannot upload as another tenant
        with pytest.raises(openai.PermissionDeniedError):
            await as_a.files.create(
                file=("a.jsonl", jsonl(line("x"))), purpose="batch", extra_headers={"X-LLMQ-Tenant": "b"}
            )


async def test_without_postgres_the_files_api_says_what_it_needs(redis: aioredis.Redis, keys: Keys) -> None:
    async with served(redis, keys, None) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:
            await client.files.list()
    assert refused.value.status_code == 503 and "database.postgres" in str(refused.value.body)


async def test_what_postgresql_cannot_store_is_a_400_not_an_outage(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    async with served(redis, keys, database_url) as url, httpx.AsyncClient(base_url=url) as http:
        created = await http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("a.jsonl", jsonl(line("x")))})
        fid = created.json()["id"]
        for method, path, body in [
            ("GET", "/v1/files/a%00b", None),
            ("GET", "/v1/files?after=%00", None),
            ("DELETE", "/v1/files/%00", None),
            ("GET", "/v1/batches/%00", None),
            (
                "POST",
                "/v1/batches",
                {"input_file_id": fid, "endpoint": "/v1/chat/completions", "metadata": {"k": "v\u0000"}},
            ),
        ]:
            answer = await http.request(method, path, json=body)
            # (a 503 would tell the client to retry, for ever, what can never be stored)
            assert answer.status_code == 400 and "cannot store" in answer.json()["error"]["message"], (
                path,
                answer.text,
            )
