"""The jobs' `console` logger: Dagster's console lines with the run's trace id, or JSON lines with
`MP_LOG_FORMAT=json` (formats in `telemetry/logs.py`). Runs pick it with `loggers: {console: {}}` in their run
config, as `mp-pipelines run` does; runs without it get Dagster's default console logger and the instance's
`python_logs` handlers."""

import logging
import sys

import dagster as dg

from mp_pipelines.telemetry.logs import formatter


@dg.logger(config_schema={"log_level": dg.Field(str, default_value="INFO", is_required=False),
                          "name": dg.Field(str, default_value="dagster", is_required=False)},
           description="Console lines with the run's trace id; JSON lines with MP_LOG_FORMAT=json.")
def console_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    config = init_context.logger_config
    level = logging.getLevelNamesMapping()[str(config["log_level"]).upper()]
    logger = logging.Logger(config["name"], level=level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter())
    logger.addHandler(handler)
    return logger


LOGGER_DEFS = {"console": console_logger}
