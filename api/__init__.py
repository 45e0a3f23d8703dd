"""The status API and live dashboard: an aiohttp server that reads the ``cluster_state`` KV bucket
(through one watch feeding an in-memory cache), answers scripts, Prometheus and browsers, and
forwards placement requests to the planner over ``placement.request``."""
