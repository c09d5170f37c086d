"""fastllava.progress: plain throttled lines in a log, a tqdm bar on a terminal, silence when disabled.

Log mode runs on a controlled clock (fastllava.progress._clock), so nothing here sleeps or depends on how
fast the machine is. Expected numbers come from the fake clock (e.g. 4 updates per second -> "4.00step/s"; tqdm pads the
rate to 5 characters, so consecutive lines stay aligned).
"""

import io
import re

import pytest

from fastllava import progress as progress_mod
from fastllava.progress import progress


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class RecordingStream(io.StringIO):
    """A non-terminal stream that records each write with the fake time it happened at."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.writes = []

    def write(self, s):
        self.writes.append((self.clock(), s))
        return super().write(s)


class TTY(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(progress_mod, "_clock", c)
    monkeypatch.delenv(progress_mod.INTERVAL_ENV, raising=False)
    return c


def run(bar, clock, updates, dt):
    for _ in range(updates):
        clock.t += dt  # binary fractions (0.25, 0.5): exact sums, no 0.999... at an interval boundary
        bar.update()


def test_log_lines_at_most_once_per_interval(clock):
    out = RecordingStream(clock)
    bar = progress(20, desc="train", unit="step", file=out, interval=1.0)
    run(bar, clock, 20, 0.25)  # 4 steps/s for 5 s
    periodic = list(out.writes)
    bar.close()

    times = [t for t, _ in periodic]
    assert times == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # a start line, then one per elapsed interval
    for _, text in out.writes:
        assert text.endswith("\n") and text.count("\n") == 1 and "\r" not in text
    # At t=2 s: 8 of 20 done at 4 step/s -> 12 left = 3 s.
    line = periodic[2][1]
    assert line.startswith("train:")
    assert " 40% 8/20 " in line
    assert "[00:02<00:03,  4.00step/s]" in line


def test_close_prints_the_final_state_exactly_once(clock):
    out = RecordingStream(clock)
    with progress(10, desc="eval", unit="batch", file=out, interval=100.0) as bar:
        run(bar, clock, 10, 0.5)
        assert len(out.writes) == 1  # only the start line: the interval never elapsed
    bar.close()  # a second close (after the context manager's) prints nothing
    assert len(out.writes) == 2
    final = out.writes[-1][1]
    assert "100% 10/10 [00:05<00:00,  2.00batch/s]" in final
    assert sum("10/10" in text for _, text in out.writes) == 1


def test_close_after_an_exception_shows_how_far_it_got(clock):
    out = RecordingStream(clock)
    with pytest.raises(RuntimeError):
        with progress(10, desc="train", unit="step", file=out, interval=100.0) as bar:
            run(bar, clock, 3, 1.0)
            raise RuntimeError("boom")
    assert " 3/10 " in out.writes[-1][1]


def test_postfix_and_resumed_rate(clock):
    out = RecordingStream(clock)
    bar = progress(200, desc="train", unit="step", initial=100, file=out, interval=5.0)
    assert " 100/200 " in out.getvalue()
    bar.set_postfix("loss 0.41 lr 2.0e-03")
    run(bar, clock, 10, 0.5)
    bar.close()
    # The rate counts from `initial`: 10 steps in 5 s = 2/s, 90 left = 45 s (not 110 steps / 5 s).
    last = out.writes[-1][1]
    assert last == "train:  55% 110/200 [00:05<00:45,  2.00step/s, loss 0.41 lr 2.0e-03]\n"


def test_disabled_draws_nothing_but_write_prints(clock):
    for stream in (io.StringIO(), TTY()):
        bar = progress(5, desc="train", file=stream, enabled=False, interval=0.0)
        assert bar.mode == "disabled"
        run(bar, clock, 5, 1.0)
        bar.set_postfix("loss 1.0")
        assert stream.getvalue() == ""
        bar.write("checkpoint saved")
        bar.close()
        assert stream.getvalue() == "checkpoint saved\n"


def test_write_in_log_mode_is_its_own_line(clock):
    out = io.StringIO()
    with progress(4, desc="train", file=out, interval=100.0) as bar:
        bar.update()
        bar.write("step 1: eval loss 2.3")
    lines = out.getvalue().splitlines(keepends=True)
    assert lines[1] == "step 1: eval loss 2.3\n"
    assert len(lines) == 3 and " 1/4 " in lines[2]


def test_terminal_gets_a_tqdm_bar():
    out = TTY()
    with progress(10, desc="train", unit="step", file=out) as bar:
        assert bar.mode == "bar"
        for _ in range(10):
            bar.update()
        bar.set_postfix("loss 0.41")
        bar.write("hello")
    text = out.getvalue()
    assert "\r" in text  # redrawn in place, frame over frame
    assert re.search(r"train: 100%\|#+\| 10/10 \[", text)  # tqdm's bar (ASCII: StringIO has no encoding)
    assert "hello\n" in text


def test_default_file_is_stdout_and_not_a_terminal_under_capture(clock, capsys):
    with progress(3, desc="lengths", unit="sample") as bar:
        assert bar.mode == "log"
        run(bar, clock, 3, 1.0)
    out = capsys.readouterr().out
    assert "\r" not in out and "3/3" in out


def test_unknown_total(clock):
    out = io.StringIO()
    with progress(None, desc="scan", unit="file", file=out, interval=100.0) as bar:
        run(bar, clock, 6, 0.5)
    assert out.getvalue().splitlines()[-1] == "scan: 6file [00:03,  2.00file/s]"


def test_interval_from_environment(clock, monkeypatch):
    monkeypatch.setenv(progress_mod.INTERVAL_ENV, "2")
    out = RecordingStream(clock)
    bar = progress(8, desc="x", file=out)
    run(bar, clock, 8, 0.5)
    assert [t for t, _ in out.writes] == [0.0, 2.0, 4.0]
    # An explicit argument wins over the environment.
    out = RecordingStream(clock)
    clock.t = 0.0
    bar = progress(8, desc="x", file=out, interval=0.0)
    run(bar, clock, 8, 0.5)
    assert len(out.writes) == 9


def test_bad_intervals_say_what_is_allowed(clock, monkeypatch):
    with pytest.raises(ValueError, match=">= 0"):
        progress(3, desc="x", file=io.StringIO(), interval=-1)
    monkeypatch.setenv(progress_mod.INTERVAL_ENV, "fast")
    with pytest.raises(ValueError, match="FASTLLAVA_PROGRESS_INTERVAL='fast' is not a number"):
        progress(3, desc="x", file=io.StringIO())
