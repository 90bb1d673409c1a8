"""Tasks: sources of prompts, tools, verifier data and workspace files for episodes.

Built in: ``arith_tool``, ``code_tests``, ``workspace_qa`` and ``jsonl`` (see each module).

>>> task = get_task("arith_tool", add=True)
>>> [inst] = task.instances("train", 1, seed=0)
"""

from rollout.tasks.arith import ArithTool
from rollout.tasks.base import (
    SPLITS,
    GeneratedTask,
    Instance,
    Task,
    get_task,
    list_tasks,
    place_files,
    register_task,
    split_of,
    tool_schemas,
)
from rollout.tasks.code import CodeTests
from rollout.tasks.jsonl import JsonlTask
from rollout.tasks.workspace_qa import WorkspaceQA

__all__ = [
    "SPLITS",
    "ArithTool",
    "CodeTests",
    "GeneratedTask",
    "Instance",
    "JsonlTask",
    "Task",
    "WorkspaceQA",
    "get_task",
    "list_tasks",
    "place_files",
    "register_task",
    "split_of",
    "tool_schemas",
]

for _task in (ArithTool, CodeTests, WorkspaceQA, JsonlTask):
    register_task(_task.name, _task, replace=True)
