"""Every downstream task ntng knows, by suite and name (GLUE and SuperGLUE both have RTE; SNI is one
generation task, ``sni``)."""

from __future__ import annotations

from app.errors import ConfigurationError
from datamodules.tasks import glue, sni, superglue
from datamodules.tasks.spec import TaskSpec

SUITES: dict[str, dict[str, TaskSpec]] = {"glue": glue.TASKS, "superglue": superglue.TASKS, "sni": sni.TASKS}


def get_task(suite: str, name: str) -> TaskSpec:
    """Look up a task of a suite by name.

    Raises:
        ConfigurationError: for an unknown suite or task, listing the known ones.
    """
    tasks = SUITES.get(suite)
    if tasks is None:
        raise ConfigurationError(f"unknown suite {suite!r}; known suites: {', '.join(SUITES)}")
    if name not in tasks:
        raise ConfigurationError(f"unknown {suite} task {name!r}; known tasks: {', '.join(tasks) or 'none'}")
    return tasks[name]


def suite_tasks(suite: str) -> list[TaskSpec]:
    """The tasks of a suite in registration order (diagnostics last); none for an unknown suite."""
    return list(SUITES.get(suite, {}).values())
