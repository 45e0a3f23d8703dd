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
RUN pip install --no-cache-dir .
ENV NATS_URL=nats://nats:4222
ENTRYPOINT ["shardplane"]
CMD ["--help"]
