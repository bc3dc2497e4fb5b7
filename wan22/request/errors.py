"""Errors the engine raises for bad input, each naming the field or file at fault."""
import difflib
from typing import Callable, Iterable, List, Sequence, Tuple


def did_you_mean(word: str, names: Iterable[str], show: Callable[[str], str] = str, n: int = 3, cutoff: float = 0.6) -> str:
    """'; did you mean X?' (or 'X or Y') for a mistyped `word`, nearest first (difflib), '' when no name is close."""
    close = [show(name) for name in difflib.get_close_matches(word, list(names), n=n, cutoff=cutoff)]
    return f"; did you mean {' or '.join(close)}?" if close else ""


class Wan22Error(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidParameter(Wan22Error, ValueError):
    """One or more parameters (or inputs) are invalid: `problems` is a list of (field, why).

    The message is ``field: why`` for each problem, joined by ``; ``: the same text on every surface (node,
    CLI, worker), which only labels the field as its caller spelled it.
    """

    def __init__(self, field: str, why: str, more: Iterable[Tuple[str, str]] = ()):
        self.problems: List[Tuple[str, str]] = [(field, why), *more]
        super().__init__(self.message)

    @property
    def field(self) -> str:
        return self.problems[0][0]

    @property
    def why(self) -> str:
        return self.problems[0][1]

    @property
    def message(self) -> str:
        return "; ".join(f"{field}: {why}" for field, why in self.problems)

    @classmethod
    def from_problems(cls, problems: Sequence[Tuple[str, str]]) -> "InvalidParameter":
        return cls(problems[0][0], problems[0][1], problems[1:])

    def relabelled(self, label: Callable[[str], str]) -> "InvalidParameter":
        """The same problems with each field renamed, e.g. ``frame_num`` -> ``params.num_frames``."""
        return InvalidParameter.from_problems([(label(field), why) for field, why in self.problems])


class ModelFolderError(Wan22Error, FileNotFoundError):
    """A model folder matches no known layout or misses part of one."""


class CheckpointError(Wan22Error, ValueError):
    """A checkpoint file is unreadable, truncated, or does not hold the expected tensors."""


class GenerationCancelled(Wan22Error):
    """The caller's cancel check asked to stop (checked before each denoising step and each transformer block)."""


class MemoryPlanError(Wan22Error, ValueError):
    """No placement of the models fits the GPU or the host; the message gives the numbers and what to change."""


class GpuOutOfMemory(Wan22Error, RuntimeError):
    """The GPU ran out of memory during a run. Everything the run moved there was moved back first."""
