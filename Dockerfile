# One image for every stage: `llmq-stage run <stage>`.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY llmq ./llmq
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 llmq
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER llmq
WORKDIR /app
EXPOSE 8080 8081 8082 8083 8084
ENTRYPOINT []
CMD ["llmq-stage", "run", "ingest"]
