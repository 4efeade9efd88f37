"""App launches by fedseg's executors: the task token goes in a private file, never on the command line."""

from __future__ import annotations

import stat
from pathlib import Path

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor.types import ExecutionSpec

from fedseg.common.runtime.appexec import TokenFileExecutor, app_argv, write_token

TOKEN = "ab" * 32


def _spec(task_type: TaskType = TaskType.SERVER_APP) -> ExecutionSpec:
    return ExecutionSpec(
        task_type=task_type,
        runtime_api_address="127.0.0.1:5",
        token=TOKEN,
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=42,
        suppress_output=True,
        task_id=7,
    )


def test_the_token_is_in_a_private_file_and_not_on_the_command_line(tmp_path: Path) -> None:
    path = write_token(tmp_path / "tokens", 7, TOKEN)
    assert path.read_text().strip() == TOKEN
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    argv = app_argv(_spec(), path)
    assert argv[0].endswith("flwr-serverapp")
    assert argv[1:] == ["--runtime-api-address", "127.0.0.1:5", "--token-file", str(path), "--insecure",
                        "--parent-pid", "42"]  # fmt: skip
    assert not any(TOKEN in part for part in argv) and "--token" not in argv
    assert write_token(tmp_path / "tokens", 7, "cd" * 32).read_text().strip() == "cd" * 32  # a retry overwrites


def test_other_task_types_are_refused_without_a_process(tmp_path: Path) -> None:
    write_token(tmp_path, 3, TOKEN)  # a killed executor's leftover is removed by the next one
    executor = TokenFileExecutor(tmp_path, frozenset({TaskType.SERVER_APP}))
    assert list(tmp_path.iterdir()) == []
    result = executor.launch(_spec(TaskType.SIMULATION))
    assert result.status == "failed" and "does not run" in (result.message or "")
    assert executor.running == {} and list(tmp_path.iterdir()) == []
