"""A clean console under the launchers (issue 19, ``dist_peft/logs.py``): rank 0 speaks for the job, the other ranks
are silent unless something goes wrong and then every line of theirs names its rank; known third-party notices
are summarised once, never shown in full.

Three launches side by side (each costs process start-up): the TP3 demo's shape (configs/demo-smollm2-lora-tp3.yaml:
megatron-core, tensor 3 on 3 torchrun ranks) on a tiny model, ZeRO-2 (configs/tiny-lora-zero2.yaml) on 2 ranks under
the DeepSpeed launcher, both with ``--log-ranks all``, and 2 plain torchrun ranks whose rank 1 fails in its second
step (``DIST_PEFT_FAULT``, ``train/faults.py``). Launch: pytest tests/test_console.py"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path

import pytest
import yaml

from dist_peft import logs
from test_launchers import REPO, _env, _free_port, _run_side_by_side

TP3 = REPO / "configs" / "demo-smollm2-lora-tp3.yaml"
ZERO2 = REPO / "configs" / "tiny-lora-zero2.yaml"
PLAIN = REPO / "configs" / "tiny-lora.yaml"
STEPS = ["--set", "train.steps=2", "--set", "train.warmup_steps=1", "--set", "train.threads=1"]
BAR = re.compile(r"^[\w ]+: +\d+%\|")
"""A progress bar's redraw (rank 0's: training; transformers writing the tiny model's folder)."""
LAUNCHER_LINES = {"zero2": ["deepspeed launcher: no hostfile; running on this node"]}
"""What a launcher process itself may say on a normal run (its known notices' summaries)."""


def _tiny_tp3(tmp_path: Path) -> Path:
    """The TP3 demo config on a tiny Llama whose heads (6, key-value 3), widths and vocabulary split over 3 ranks,
    with synthetic data."""
    raw = yaml.safe_load(TP3.read_text())
    raw["model"] = {"source": "tiny-llama", "tiny": {"hidden_size": 96, "intermediate_size": 192, "vocab_size": 261,
                                                     "num_attention_heads": 6, "num_key_value_heads": 3}}
    raw["data"] = {"source": "synthetic", "seq_len": 32, "eval_examples": 16}
    path = tmp_path / "tp3.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _launch(script: str, config: Path, run_dir: Path, nproc: int, *extra: str, **env: str):
    return (["bash", script, str(config), *STEPS, "--set", f"output.dir={run_dir}", *extra],
            _env(NPROC=str(nproc), **env))


def _lines(out: str) -> list[str]:
    """The console's non-blank lines, a progress bar's redraws split apart."""
    return [piece for line in out.splitlines() for piece in line.split("\r") if piece.strip()]


def _split(out: str) -> tuple[list[str], dict]:
    """(console lines other than the JSON summary; the summary)."""
    lines = _lines(out)
    start = lines.index("{")
    end = lines.index("}", start)
    return lines[:start] + lines[end + 1:], json.loads("\n".join(lines[start:end + 1]))


def _logged(path: Path) -> list[str]:
    """The messages of a rank's log file, without its time stamp and rank prefix."""
    return [re.sub(r"^\S+ \S+ \[rank \d+\] ", "", line) for line in path.read_text().splitlines()]


def test_rank_0_speaks_for_the_job_and_a_failing_rank_names_itself(tmp_path):
    """TP3 (megatron-core, 3 ranks) and ZeRO-2 (DeepSpeed launcher, 2 ranks): every console line is the progress
    bar, the JSON summary, a line of rank 0's own log or a launcher's summary line: no line comes from another rank
    although each rank logged the same messages to output.dir/logs/rank{R}.log (so ``held-out before`` shows once);
    no warning line and no known notice in full (megatron-core's Transformer Engine / Apex warnings: one summary
    line). Rank 1 failing under torchrun: its error shows as ``[rank 1] error: OSError: ...`` with its traceback,
    every line prefixed."""
    launches = {
        "tp3": _launch("launch/torchrun.sh", _tiny_tp3(tmp_path), tmp_path / "tp3", 3, "--log-ranks", "all"),
        "zero2": _launch("launch/deepspeed.sh", ZERO2, tmp_path / "zero2", 2, "--log-ranks", "all",
                         MASTER_PORT=str(_free_port())),
        "crash": _launch("launch/torchrun.sh", PLAIN, tmp_path / "crash", 2, DIST_PEFT_FAULT="enospc:step:1:1",
                         MAX_RESTARTS="0"),
    }
    results = _run_side_by_side(launches)
    for name, ranks in (("tp3", 3), ("zero2", 2)):
        rc, out = results[name]
        assert rc == 0, f"{name} failed:\n{out[-3000:]}"
        lines, summary = _split(out)
        assert summary["steps"] == 2
        files = [tmp_path / name / "logs" / f"rank{r}.log" for r in range(ranks)]
        own = set(_logged(files[0]))
        for line in lines:
            assert BAR.match(line) or line in own or line in LAUNCHER_LINES.get(name, ()), \
                f"{name}: a line rank 0 did not log:\n{line}\n---\n{out[-3000:]}"
        for f in files[1:]:
            assert any(m.startswith("held-out before: ") for m in _logged(f)), f  # the others spoke, to their file
        assert sum(line.startswith("held-out before: ") for line in lines) == 1, out[-3000:]
        assert not any("warning" in line.lower() for line in lines), out[-3000:]
        for text in [n.message for n in logs.NOTICES]:
            assert text not in out, f"{name}: {text}"
        for line in LAUNCHER_LINES.get(name, ()):
            assert lines.count(line) == 1, (name, line)
    tp3 = _split(results["tp3"][1])[0]
    assert tp3.count(logs.NOTICES[0].summary) == 1  # megatron-core warned on every rank; rank 0 said it once

    rc, out = results["crash"]
    assert rc != 0, out[-3000:]
    lines = _lines(out)
    error = "[rank 1] error: OSError: [Errno 28] No space left on device (injected by DIST_PEFT_FAULT)"
    assert any(line.startswith(error) for line in lines), out[-3000:]
    first = lines.index("[rank 1] Traceback (most recent call last):")
    last = next(i for i in range(first, len(lines)) if lines[i].startswith("[rank 1] OSError: [Errno 28]"))
    assert all(line.startswith("[rank 1] ") for line in lines[first:last + 1]), "\n".join(lines[first:last + 1])
    assert not (tmp_path / "crash" / "logs").exists()  # per-rank files only when asked for


@pytest.fixture
def console(monkeypatch):
    """``logs.setup(level)`` as rank R of a job of W ranks, for one test; everything it set is undone after."""
    root, ours = logging.getLogger(), logging.getLogger("dist_peft")
    saved = root.level, ours.level, warnings.showwarning
    for handler in logs._state.get("handlers", ()):  # left by an earlier cli.main() in this process
        root.removeHandler(handler)
    monkeypatch.setattr(logs, "_said", set())
    monkeypatch.setattr(logs, "_state", {})
    for variable in logs.PROGRESS_BARS_OFF:  # restored after the test (setup sets them on ranks other than 0)
        monkeypatch.delenv(variable, raising=False)

    def configure(rank: int, world: int, level: str | None = None) -> None:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        logs.setup(level)

    yield configure
    for handler in logs._state.get("handlers", ()):
        root.removeHandler(handler)
    root.setLevel(saved[0])
    ours.setLevel(saved[1])
    warnings.showwarning = saved[2]


def _warn(text: str, module: str) -> None:
    """A UserWarning as ``module`` would raise it (its file under site-packages), past the once-per-place registry."""
    path = f"/venv/lib/python3.11/site-packages/{module.replace('.', '/')}.py"
    warnings.warn_explicit(text, UserWarning, path, 21, module=module)


def test_known_notices_are_matched_by_exact_text_and_module(console, capsys):
    """Rank 0: a known notice from its own module is one summary line at INFO, said once however often it comes,
    in full only at DEBUG; the same text from another module, or other text from that module, still shows as a
    warning. Rank 1 of 2: INFO is silent, a warning shows, every line prefixed with its rank; no progress bars."""
    apex = next(n for n in logs.NOTICES if n.module == "megatron.core.models.backends")
    console(0, 2)
    for _ in range(3):
        _warn(apex.message, apex.module)
    _warn(apex.message, "megatron.core.models.other")
    _warn(apex.message + " (and more)", apex.module)
    err = capsys.readouterr().err.splitlines()
    assert err.count(apex.summary) == 1 and not any(apex.message == line for line in err)
    shown = [line for line in err if line.startswith("[rank 0] warning: UserWarning: ")]
    assert len(shown) == 2 and "megatron/core/models/other.py:21" in shown[0] and "(and more)" in shown[1], err
    console(0, 1, "DEBUG")
    _warn(apex.message, apex.module)
    assert apex.message in capsys.readouterr().err  # the notice in full, at DEBUG
    assert not any(v in os.environ for v in logs.PROGRESS_BARS_OFF)
    console(1, 2)
    assert all(os.environ[v] == "1" for v in logs.PROGRESS_BARS_OFF)
    logging.getLogger("dist_peft.train.loop").info("held-out before: loss 1.0")
    logging.getLogger("megatron.core").warning("two\nlines")
    assert capsys.readouterr().err.strip().splitlines() == ["[rank 1] warning: [megatron.core] two",
                                                            "[rank 1] lines"]
