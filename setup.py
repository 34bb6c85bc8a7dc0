from setuptools import find_packages, setup

setup(
    name="mp-pipelines",
    version="0.1.0",
    description="Multi-step LLM prompt workflows that run as Dagster jobs.",
    python_requires=">=3.11",
    packages=find_packages(exclude=["mp_pipelines_tests", "mp_pipelines_tests.*"]),
    package_data={"mp_pipelines": ["workflows/*.yaml", "workflows/data/*", "workflows/data/*/*", "workflows/prompts/*",
                                   "workflows/templates/*/*", "workflows/templates/*/data/*/*",
                                   "workflows/templates/*/data/*/*/*"]},
    install_requires=[
        # dagster, dagster-webserver, dagster-graphql and dagster-postgres move together (dagster-postgres
        # 0.29.N goes with dagster 1.13.N): with an unpinned dagster, pip can pick a dagster for which no
        # matching dagster-postgres is published yet and silently fall back to a years-old dagster-postgres.
        # mp_pipelines/dagster_ext/compat.py names the Dagster internals used with this version.
        "dagster==1.13.27",
        "dagster-webserver==1.13.27",
        "dagster-postgres==0.29.27",
        "dagster-graphql==1.13.27",  # `mp-pipelines launch/status/cancel/reload` (DagsterGraphQLClient)
        "dagster-celery==0.29.27",  # `--executor celery` and `mp-pipelines worker` (with celery 5, kombu)
        "redis>=5",  # Celery's Redis broker/backend and the fleet's shared limits (MP_LIMITS_REDIS_URL)
        # SQLAlchemy 2.1 maps postgresql:// to psycopg 3, which breaks dagster-postgres 0.29.27.
        "sqlalchemy>=2.0,<2.1",
        "openai>=1.40",
        "httpx>=0.27",
        "pydantic>=2.6",
        "pandas>=2.1",
        "pyarrow>=14",
        "jinja2>=3.1",
        "jsonschema>=4.20",
        "pyyaml>=6",
        "click>=8.1",
        "croniter>=2.0",  # schedule cron strings are checked without Dagster (spec/ imports no Dagster)
        "aiolimiter>=1.1",
        "starlette>=0.37",
        "uvicorn>=0.29",
        # traces and metrics (telemetry/): exported only when OTEL_EXPORTER_OTLP_ENDPOINT is set; Prometheus via a
        # Pushgateway (MP_PROMETHEUS_PUSHGATEWAY); `mp-pipelines stats --html` draws with plotly
        "opentelemetry-sdk>=1.30",
        "opentelemetry-exporter-otlp-proto-http>=1.30",
        "prometheus-client>=0.20",
        "plotly>=5.20",
    ],
    extras_require={
        # playwright drives the Debian chromium package (never `playwright install`): test_ui_browser.py
        "dev": [
            "pytest>=8", "pytest-timeout>=2.3", "ruff>=0.5", "playwright>=1.45", "hypothesis>=6.100",
            "import-linter>=2.1",  # `lint-imports`: the layer contracts in .importlinter
            "websockets>=12",  # test_access_control.py: GraphQL over the proxied websocket
            "opentelemetry-proto>=1.30",  # the loopback OTLP receiver of test_observability.py decodes with it
            # test_component.py: a throw-away `dg` project using mp_pipelines.PromptWorkflow; the dg family moves
            # with dagster (1.13.N), and unpinned pip may pick a dg that wants another dagster
            "dagster-dg-cli==1.13.27", "create-dagster==1.13.27",
        ],
    },
    entry_points={
        "console_scripts": ["mp-pipelines=mp_pipelines.cli:main"],
        # `dg list components` / `dg scaffold defs`: the mp_pipelines.PromptWorkflow component (components.py)
        "dagster_dg_cli.registry_modules": ["mp_pipelines = mp_pipelines"],
    },
)
