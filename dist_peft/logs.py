"""One readable console per job (issue 19): rank 0 speaks for the job, the other ranks only when something goes
wrong, every such line names its rank, and the third-party notices this set-up triggers are said once.

``setup(level, ranks)`` configures ``logging`` once per process, first thing in the CLI (before megatron-core or
DeepSpeed are imported, so the hooks below see their import-time warnings):

- Console (stderr): rank 0 at ``level`` (``--log-level`` / ``$DIST_PEFT_LOG_LEVEL``, default INFO), every other rank
  at WARNING. INFO lines are the bare message; a warning or error is ``warning: ...`` / ``error: ...`` and, in a
  job of several ranks, every line of it (a traceback included) starts with ``[rank R] ``.
- ``dist_peft.*`` loggers log at ``level``; third-party loggers at WARNING (DEBUG when ``level`` is DEBUG), so a
  library's INFO chatter never reaches the console. DeepSpeed's, transformers', datasets' and huggingface_hub's
  loggers, which print through handlers of their own, are routed through these instead (rank prefix, one format).
- ``--log-ranks all`` (or ``0,5``): those ranks also write everything they log at ``level`` to
  ``output.dir/logs/rank{R}.log`` (``rank_files``, once the config names the folder).
- Known notices (``NOTICES``: a message that says nothing actionable on this set-up, matched by its exact text
  and the module that emits it, never by category or pattern) are shown in full at DEBUG only; the first of each
  kind logs its one-line summary at INFO. Any other warning shows, as ``warning: Category: text (file:line)``.
- Ranks other than 0 show no progress bars (``PROGRESS_BARS_OFF``, read by huggingface_hub, transformers and
  datasets when they are imported).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

LEVEL_ENV = "DIST_PEFT_LOG_LEVEL"
PROGRESS_BARS_OFF = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Notice:
    """A third-party message known to say nothing actionable here, and what rank 0 says once instead."""

    module: str
    """The emitting module (dotted; its file is matched, ``pkg`` also as ``pkg/__init__.py``)."""
    message: str
    """The exact text."""
    summary: str


_TE_APEX = "megatron-core: Transformer Engine and Apex not installed; using PyTorch kernels (norms, optimizers)"
_MULTI_TENSOR = "Transformer Engine and Apex are not installed. Falling back to local implementations of "
NOTICES = (
    # megatron-core 0.16 at import, once per module and rank (10 warnings per rank): the fused kernels of
    # Transformer Engine / Apex are absent, as always on a CPU; the PyTorch fallbacks compute the same values.
    Notice("megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision",
           _MULTI_TENSOR + "multi_tensor_applier and multi_tensor_scale", _TE_APEX),
    Notice("megatron.core.optimizer.optimizer", _MULTI_TENSOR + "multi_tensor_applier and multi_tensor_scale",
           _TE_APEX),
    Notice("megatron.core.optimizer.clip_grads",
           _MULTI_TENSOR + "multi_tensor_applier, multi_tensor_l2norm, and multi_tensor_scale", _TE_APEX),
    Notice("megatron.core.optimizer", "Transformer Engine and Apex are not installed. Falling back to Torch "
           "optimizers.", _TE_APEX),
    Notice("megatron.core.models.backends", "Apex is not installed. Falling back to Torch Norm", _TE_APEX),
    Notice("megatron.core.models.gpt.gpt_layer_specs", "Apex is not installed. Falling back to Torch Norm", _TE_APEX),
    # megatron-core 0.16 on every TransformerConfig: its own default cuda_graph_scope "full" (0.19's default,
    # None, does not warn; passing [] there warns that cuda_graph_scope itself is deprecated). CUDA graphs are off.
    Notice("megatron.core.transformer.transformer_config", "full scope is deprecated. Use empty cuda_graph_scope to "
           "capture the whole layer.", "megatron-core: a deprecation notice about its own defaults hidden"),
    # DeepSpeed's launcher on one node (launch/deepspeed.sh without HOSTFILE).
    Notice("deepspeed.launcher.runner", "Unable to find hostfile, will proceed with training with local resources "
           "only.", "deepspeed launcher: no hostfile; running on this node"),
)

_said: set[str] = set()  # summaries logged by this process
_state: dict = {}  # rank, world, level, ranks with files, handlers we own


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the job's size from the launcher's environment (torchrun, DeepSpeed, Slurm via
    torchrun set RANK / WORLD_SIZE; mpirun sets its own variables before ``mpi_job`` exports RANK)."""
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                                ("PMIX_RANK", "PMIX_SIZE"), ("PMI_RANK", "PMI_SIZE")):
        if rank_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ.get(world_var, "1"))
    return 0, 1


def _known(path: str, message: str) -> Notice | None:
    path = path.replace(os.sep, "/")
    for notice in NOTICES:
        stem = "/" + notice.module.replace(".", "/")
        if message == notice.message and (path.endswith(stem + ".py") or path.endswith(stem + "/__init__.py")):
            return notice
    return None


def _note(notice: Notice, detail: str) -> None:
    """Log a known notice in full at DEBUG and its summary once at INFO."""
    _log.debug("known notice (%s): %s", notice.summary, detail)
    if notice.summary not in _said:
        _said.add(notice.summary)
        _log.info(notice.summary)


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` (how a warning the filters let through is shown): known notices summarised,
    any other warning logged on ``py.warnings`` (as ``logging.captureWarnings`` would, with the rank prefix)."""
    notice = _known(filename, str(message))
    if notice is not None:
        _note(notice, f"{category.__name__}: {message} ({filename}:{lineno})")
    elif file is not None:  # an explicit stream: shown there, as Python would
        warnings._showwarning_orig(message, category, filename, lineno, file, line)  # type: ignore[attr-defined]
    else:
        logging.getLogger("py.warnings").warning("%s: %s (%s:%s)", category.__name__, message, filename, lineno)


class _Adopt(logging.Filter):
    """On a library logger that prints through its own handler (DeepSpeed's to stdout, transformers' to stderr):
    known notices are summarised, every other record goes to the root's handlers (our format and rank rules), and
    the library's handler prints nothing. A logger filter sees only records logged on that very logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        notice = _known(record.pathname, record.getMessage())
        if notice is not None:
            _note(notice, f"{record.name}: {record.getMessage()} ({record.pathname}:{record.lineno})")
        else:
            logging.getLogger().handle(record)
        return False


class _Format(logging.Formatter):
    """INFO: the message; DEBUG, WARNING and up: ``level: [logger] message`` (a third-party logger named). Every
    line (a traceback's too) starts with ``prefix_all``, a warning's or error's also with ``prefix_problems``; with
    ``stamp``, first the time."""

    def __init__(self, prefix_all: str, prefix_problems: str, stamp: bool = False):
        super().__init__()
        self.prefix_all, self.prefix_problems, self.stamp = prefix_all, prefix_problems, stamp

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        problem = record.levelno >= logging.WARNING
        if problem or record.levelno < logging.INFO:
            ours = record.name.startswith("dist_peft") or record.name == "py.warnings"
            text = f"{record.levelname.lower()}: " + ("" if ours else f"[{record.name}] ") + text
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        prefix = self.prefix_all + (self.prefix_problems if problem else "")
        if self.stamp:
            prefix = self.formatTime(record) + " " + prefix
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class _Console(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest's capture, a redirected stream). Rank 0 writes
    through ``tqdm.write``, which clears its own progress bar and redraws it below the line; another rank starts
    its lines on a fresh line, since rank 0's bar may stand unfinished on the terminal they share."""

    def __init__(self, fresh_line: bool):
        super().__init__()
        self.fresh_line = fresh_line

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if self.fresh_line:
                sys.stderr.write("\n" + text + "\n")
                sys.stderr.flush()
            else:
                tqdm.write(text, file=sys.stderr)
        except Exception:  # noqa: BLE001 — logging's own policy for a failing handler
            self.handleError(record)


def parse_level(value: str | None) -> int:
    """A standard ``logging`` level name (any case) → its number; None or empty → INFO."""
    name = (value or "INFO").strip().upper()
    if name not in LEVELS:
        raise ValueError(f"log level {value!r}: expected one of {', '.join(LEVELS)}")
    return getattr(logging, name)


def parse_ranks(value: str | None) -> set[int] | str | None:
    """``--log-ranks``: None (rank 0 on the console only), ``all`` or a comma list of ranks with files."""
    if not value:
        return None
    if value == "all":
        return "all"
    try:
        return {int(r) for r in value.split(",")}
    except ValueError:
        raise ValueError(f"--log-ranks {value}: expected all or a comma list of ranks, e.g. 0,5") from None


def setup(level: str | None = None, ranks: str | None = None) -> None:
    """Configure this process's logging (module docstring); calling it again replaces what it set before.
    ``level`` None: ``$DIST_PEFT_LOG_LEVEL``, else INFO. Raises ValueError for an unknown level or rank list."""
    number = parse_level(level if level is not None else os.environ.get(LEVEL_ENV))
    rank, world = rank_and_world()
    root = logging.getLogger()
    for handler in _state.get("handlers", ()):
        root.removeHandler(handler)
        handler.close()
    console = _Console(fresh_line=rank != 0)
    console.setLevel(number if rank == 0 else max(number, logging.WARNING))
    console.setFormatter(_Format("", f"[rank {rank}] " if world > 1 or rank else ""))
    root.addHandler(console)
    root.setLevel(logging.DEBUG if number <= logging.DEBUG else logging.WARNING)
    logging.getLogger("dist_peft").setLevel(number)
    _state.update(rank=rank, world=world, level=number, ranks=parse_ranks(ranks), handlers=[console])
    if rank != 0:
        for variable in PROGRESS_BARS_OFF:
            os.environ.setdefault(variable, "1")
    warnings.showwarning = _showwarning
    deepspeed = logging.getLogger("DeepSpeed")  # deepspeed.utils.logger, whenever DeepSpeed creates it
    if not any(isinstance(f, _Adopt) for f in deepspeed.filters):
        deepspeed.addFilter(_Adopt())
    _adopt_libraries()


LIBRARY_LOGGING = {"transformers": "transformers.utils.logging", "datasets": "datasets.utils.logging",
                   "huggingface_hub": "huggingface_hub.utils.logging"}
"""Libraries whose logging module gives their top logger a stderr handler of its own when imported."""


def _adopt_libraries() -> None:
    """Import each library's logging module now (it is imported for training anyway) and take its own handler off
    its top logger, with propagation on (transformers turns it off): their records then reach the root's handlers
    once, with the rank prefix, instead of twice or without it."""
    for name, module in LIBRARY_LOGGING.items():
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(module)
        top = logging.getLogger(name)
        for handler in [h for h in top.handlers if type(h) is logging.StreamHandler]:
            top.removeHandler(handler)
        top.propagate = True


def rank_files(run_dir: str | Path) -> Path | None:
    """With ``--log-ranks`` naming this rank: also log everything at the chosen level to
    ``run_dir/logs/rank{R}.log`` (appended: a resumed run continues it). Returns the file, or None."""
    ranks, rank = _state.get("ranks"), _state.get("rank", 0)
    if ranks is None or (ranks != "all" and rank not in ranks):
        return None
    path = Path(run_dir) / "logs" / f"rank{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(_state["level"])
    handler.setFormatter(_Format(f"[rank {rank}] ", "", stamp=True))
    logging.getLogger().addHandler(handler)
    _state["handlers"].append(handler)
    return path
