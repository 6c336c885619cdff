"""Progress in a log file: whole lines at fixed intervals, with rate and ETA (llada_train/progress.py)."""

import io

from llada_train.progress import LineProgress, progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_lines_every_interval_and_every_five_percent_with_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(1000, initial=200, desc="sft", file=out, clock=clock, interval_s=30.0)
    for _ in range(49):  # 2 s a step: a line when 30 s have passed, none at the 5% marks (every 50 steps) yet
        clock.t += 2.0
        bar.update(1)
        bar.set_postfix(loss="0.250")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("[sft] 215/1000 (22%), 2.00 s/step, elapsed 0:30, ETA 26:10")
    assert lines[0].endswith("loss=0.250")
    clock.t += 2.0
    bar.update(1)  # step 250: a 5% mark
    assert out.getvalue().splitlines()[-1].startswith("[sft] 250/1000 (25%)")
    bar.close()
    assert len(out.getvalue().splitlines()) == 4  # nothing new since the last line
    assert "\r" not in out.getvalue()


def test_unknown_total_counts_and_rates_only():
    out, clock = io.StringIO(), Clock()
    with LineProgress(None, desc="tokenize", unit="doc", file=out, clock=clock) as bar:
        clock.t = 31.0
        bar.update(620)
    assert out.getvalue().splitlines() == ["[tokenize] 620 docs, 20.0 doc/s, elapsed 0:31"]


def test_a_terminal_keeps_the_bar_and_a_file_gets_lines(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert not isinstance(progress(10, desc="x", file=Terminal()), LineProgress)
    with (tmp_path / "log").open("w") as f:
        assert isinstance(progress(10, desc="x", file=f), LineProgress)
