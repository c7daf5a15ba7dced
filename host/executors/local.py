"""``--executor local`` (the default): every build in this process, one after the other, when it is submitted.

No Ray, no copies: the build writes straight into its folder with the model and data the command already opened,
as the host always did. Builds then never overlap a measurement (the caller builds a round's candidates before it
measures them), which is what a machine that is itself the device under test needs.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from host.executors.base import Built, BuildTask, run_local


class _Done:
    def __init__(self, built: Optional[Built], error: Optional[BaseException]) -> None:
        self._built, self._error = built, error

    def result(self) -> Built:
        if self._error is not None:
            raise self._error
        assert self._built is not None
        return self._built

    def done(self) -> bool:
        return True

    def cancel(self) -> None:
        pass


class LocalExecutor:
    name = "local"
    synchronous = True
    builds_on_this_machine = True

    def submit(self, task: BuildTask) -> _Done:
        try:
            return _Done(run_local(task), None)
        except Exception as e:  # noqa: BLE001 - handed to whoever asks for the result, as a future would
            return _Done(None, e)

    def describe(self) -> Dict[str, Any]:
        return {"executor": "local"}

    def close(self) -> None:
        pass
