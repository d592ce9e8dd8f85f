"""The sinks: TensorBoard, Weights & Biases and MLflow, each logging one Report as one tracker run.

Each imports its package only when used. What goes where:

- TensorBoard (``torch.utils.tensorboard``): ``<run>/tb/`` (or ``<TARGET>/<kind>_<hash>/``); every series as
  scalars (tag = series name, step = its axis value), settings as hparams, tags and tables as text, figures as
  images.
- W&B: project TARGET, else ``WANDB_PROJECT``, else ``stability``; ``mode`` from the environment
  (``WANDB_MODE=offline``); files under ``WANDB_DIR``, else beside the results root. The run is named
  ``<kind>_<hash>``, grouped by the grid's name; series are logged with their axis (``define_metric``), the
  settings as config, tables as ``wandb.Table``, figures as images.
- MLflow: tracking URI TARGET, else ``MLFLOW_TRACKING_URI``, else the file store ``mlruns/`` beside the results
  root; experiment = the grid's name, else ``stability``; series as metrics with steps, settings as params, tags
  as tags, tables as CSV artifacts, figures as PNG artifacts.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from .records import Report

__all__ = ["MlflowSink", "Sink", "TensorBoardSink", "WandbSink"]


def _hparam(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) else str(value)


class Sink(ABC):
    """A tracker: ``log(report)`` sends one finished run; ``target``: what ``NAME:TARGET`` named."""

    name = ""
    package = ""  # the module it imports (and the extra that installs it)

    def __init__(self, target: str | None, results_root: Path):
        self.target = target or None
        self.results_root = Path(results_root)

    @abstractmethod
    def log(self, report: Report) -> None:
        """Send one finished run's report."""


class TensorBoardSink(Sink):
    name, package = "tensorboard", "tensorboard"

    def log_dir(self, report: Report) -> Path:
        """``<run>/tb/``, or ``<TARGET>/<grid>/<kind>_<hash>/`` (the grid's folder only when there is a grid)."""
        if self.target is None:
            return report.path / "tb"
        group = report.tags.get("group")
        return Path(self.target) / group / report.name if group else Path(self.target) / report.name

    def log(self, report: Report) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        log_dir = self.log_dir(report)
        log_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(log_dir, os.W_OK):
            raise PermissionError(f"cannot write to {log_dir}")
        writer = SummaryWriter(log_dir=str(log_dir))
        try:
            for tag, points in report.series().items():
                for step, value in points:
                    writer.add_scalar(tag, value, step)
            for key, value in report.tags.items():
                writer.add_text(f"run/{key}", str(value))
            for name, table in report.tables.items():
                writer.add_text(f"table/{name}", table.to_markdown(index=False) if _has_tabulate()
                                else f"```\n{table.to_csv(index=False)}```")
            for name, draw in report.figures.items():
                writer.add_figure(f"figure/{name}", draw())
            last = {f"hparam/{tag}": points[-1][1] for tag, points in report.series().items()}
            experiment, start, end = hparams({k: _hparam(v) for k, v in report.params.items()}, last)
            for summary in (experiment, start, end):
                writer.file_writer.add_summary(summary)
        finally:
            writer.close()


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


class WandbSink(Sink):
    name, package = "wandb", "wandb"

    def log(self, report: Report) -> None:
        import wandb

        directory = Path(os.environ.get("WANDB_DIR") or self.results_root.resolve().parent)
        directory.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=self.target or os.environ.get("WANDB_PROJECT") or "stability",
                         entity=os.environ.get("WANDB_ENTITY") or None, name=report.name,
                         group=report.tags.get("group"), job_type=report.kind, dir=str(directory),
                         config=report.params, tags=[report.kind], notes=report.tags["run_dir"],
                         reinit="create_new")
        try:
            run.summary.update({f"run/{k}": v for k, v in report.tags.items()})
            for axis in {row.axis for row in report.rows}:
                run.define_metric(axis, hidden=True)
            for row in report.rows:
                for tag in row.values:
                    run.define_metric(tag, step_metric=row.axis)
            for row in report.rows:
                run.log({row.axis: row.step, **row.values})
            for name, table in report.tables.items():
                run.log({f"table/{name}": wandb.Table(dataframe=table.astype(object).where(table.notna(), None))})
            for name, draw in report.figures.items():
                run.log({f"figure/{name}": wandb.Image(draw())})
        finally:
            run.finish()


class MlflowSink(Sink):
    name, package = "mlflow", "mlflow"

    def tracking_uri(self) -> str:
        if self.target:
            return self.target
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return (self.results_root.resolve().parent / "mlruns").as_uri()

    def log(self, report: Report) -> None:
        import time

        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        uri = self.tracking_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps the file store behind this switch; it is the local default here
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=uri)
        experiment_name = report.tags.get("group") or "stability"
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
        tags = {**{f"stability.{k}": str(v) for k, v in report.tags.items()}, "mlflow.runName": report.name}
        run = client.create_run(experiment_id, tags=tags, run_name=report.name)
        run_id, status = run.info.run_id, "FAILED"
        try:
            now = int(time.time() * 1000)
            params = [Param(k, str(v)[:6000]) for k, v in report.params.items()]
            metrics = [Metric(_metric_key(tag), value, now, step) for tag, points in report.series().items()
                       for step, value in points]
            for i in range(0, len(params), 100):
                client.log_batch(run_id, params=params[i:i + 100])
            for i in range(0, len(metrics), 1000):
                client.log_batch(run_id, metrics=metrics[i:i + 1000])
            client.log_batch(run_id, tags=[RunTag("stability.kind", report.kind)])
            for name, table in report.tables.items():
                client.log_text(run_id, table.to_csv(index=False), f"tables/{name}.csv")
            for name, draw in report.figures.items():
                client.log_figure(run_id, draw(), f"figures/{name}.png")
            status = "FINISHED"
        finally:
            client.set_terminated(run_id, status)


def _metric_key(tag: str) -> str:
    return tag.replace("@", "_")


SINKS: dict[str, type[Sink]] = {s.name: s for s in (TensorBoardSink, WandbSink, MlflowSink)}
