"""The interactive progress line: '\\r' updates on a terminal, nothing anywhere else, and log
lines that still start at column 0 and read exactly as in out.log."""
import io
import logging
import re

import torch

from open_clip_train.demo_data import generate
from open_clip_train.main import main
from open_clip_train.progress import ProgressLine, fmt_duration

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d,\d\d:\d\d:\d\d \| ")


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self, step: float = 2.0):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += self.step


def render(raw: str):
    """What a terminal shows for `raw`: '\\r' returns to column 0 and later characters overwrite.
    Returns the finished lines (right-stripped) and the line the cursor is still on."""
    lines, cur, col = [], [], 0
    for ch in raw:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("".join(cur).rstrip())
            cur, col = [], 0
        else:
            if col < len(cur):
                cur[col] = ch
            else:
                cur.append(ch)
            col += 1
    return lines, "".join(cur).rstrip()


def draws(raw: str):
    """The lines drawn: each is written as '\r' + text + '\r'; clearing writes spaces."""
    return [d for d in raw.split("\r") if d.strip()]


def run_steps(progress: ProgressLine, clock: Clock, steps: int, samples: int = 8):
    for step in range(1, steps + 1):
        clock.tick()
        progress.update(step, 2.0 / step, samples)


def test_terminal_gets_carriage_return_updates_with_step_and_eta():
    stream, clock = FakeTTY(), Clock()
    with ProgressLine(4, epoch=0, epochs=2, stream=stream, clock=clock, min_interval=0, width=200) as progress:
        run_steps(progress, clock, 2)
        raw = stream.getvalue()
    assert raw.startswith("\r") and "\n" not in raw
    # step 1 took 2 s; 3 steps of this epoch and 4 of the next remain: 14 s
    assert draws(raw) == ["epoch 1/2  step 1/4  loss 2.0000  4.0 samples/s  ETA 0:00:14",
                          "epoch 1/2  step 2/4  loss 1.0000  4.0 samples/s  ETA 0:00:12"]
    assert render(raw)[1] == "epoch 1/2  step 2/4  loss 1.0000  4.0 samples/s  ETA 0:00:12"
    assert render(stream.getvalue()) == ([], "")  # closing wipes the line


def test_not_a_terminal_or_not_rank_0_writes_nothing():
    clock = Clock()
    for stream, enabled in ((io.StringIO(), True), (FakeTTY(), False)):
        with ProgressLine(4, stream=stream, clock=clock, min_interval=0, enabled=enabled) as progress:
            run_steps(progress, clock, 4)
        assert stream.getvalue() == ""


def test_a_closed_or_broken_stream_does_not_stop_training():
    class Broken(FakeTTY):
        def write(self, s):
            raise OSError("terminal gone")

    clock = Clock()
    with ProgressLine(4, stream=Broken(), clock=clock, min_interval=0) as progress:
        run_steps(progress, clock, 4)
        assert not progress.active


def test_log_lines_clear_the_progress_line_first(tmp_path):
    stream, clock = FakeTTY(), Clock()
    root = logging.getLogger()
    tty, log_file = logging.StreamHandler(stream), logging.FileHandler(tmp_path / "out.log")
    for h in (tty, log_file):
        h.setFormatter(logging.Formatter("%(levelname)s | %(message)s"))
        root.addHandler(h)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        with ProgressLine(4, stream=stream, clock=clock, min_interval=0, width=200) as progress:
            run_steps(progress, clock, 1)
            logging.info("hi")  # shorter than the progress line: leftovers would show
            run_steps(progress, clock, 1)
            assert tty.filters and not log_file.filters  # only the handler on the progress stream
        assert not tty.filters  # and removed again
        logging.info("after")
    finally:
        root.setLevel(level)
        for h in (tty, log_file):
            root.removeHandler(h)
            h.close()
    lines, current = render(stream.getvalue())
    assert lines == ["INFO | hi", "INFO | after"] and current == ""
    assert "step 1/4" in stream.getvalue() and "step 1/4" not in "".join(lines)
    assert (tmp_path / "out.log").read_text() == "INFO | hi\nINFO | after\n"


def test_redraws_are_throttled_but_the_last_step_is_always_drawn():
    stream, clock = FakeTTY(), Clock(step=0.01)
    with ProgressLine(50, stream=stream, clock=clock, min_interval=0.1, width=200) as progress:
        run_steps(progress, clock, 50)
        drawn = draws(stream.getvalue())
    assert 5 <= len(drawn) <= 6  # every 10th step (0.1 s), the first and the last
    assert "step 1/50" in drawn[0] and "step 50/50" in drawn[-1] and "ETA 0:00:00" in drawn[-1]


def test_the_line_fits_the_terminal_and_is_padded_over_the_previous_one():
    def first_two_draws(width):
        stream, clock = FakeTTY(), Clock()
        with ProgressLine(4, stream=stream, clock=clock, min_interval=0, width=width) as progress:
            for step, loss in ((1, 123456.0), (2, 1.0)):  # a long loss, then a short one
                clock.tick()
                progress.update(step, loss, 8)
            return stream.getvalue().split("\r")[1:4:2]

    first, second = first_two_draws(200)
    assert "loss 123456.0000" in first and "loss 1.0000" in second
    assert len(second) == len(first) and second.endswith("     ")  # spaces over the longer line's end
    # a line wider than the terminal would wrap, and '\r' could not redraw it: cut to width - 1
    assert [len(d) for d in first_two_draws(30)] == [29, 29]


def test_fmt_duration():
    assert [fmt_duration(s) for s in (0, 59.9, 61, 3600 * 25 + 62, -3)] == ["0:00:00", "0:00:59", "0:01:01",
                                                                            "25:01:02", "0:00:00"]


def test_training_on_a_terminal_keeps_out_log_clean(tmp_path, monkeypatch):
    """A whole run with stderr on a (fake) terminal: updates with step/total and ETA on stderr,
    every log line on stderr exactly as in out.log, and no '\\r' in out.log."""
    demo = generate(tmp_path / "demo", num_train=32, num_val=8, image_size=32, seed=0)
    tty = FakeTTY()
    monkeypatch.setattr("sys.stderr", tty)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    argv = ["--model", "tiny-convnext-cliptext", "--dataset-type", "coco", "--train-data", str(demo.train_annotations),
            "--epochs", "1", "--batch-size", "4", "--workers", "0", "--precision", "fp32", "--no-augment",
            "--coco-caption-sampling", "random", "--lr", "1e-3", "--warmup", "1", "--device", "cpu",
            "--log-every-n-steps", "3", "--log-dir", str(tmp_path / "logs"), "--name", "tty"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread is faster than two competing
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    raw = tty.getvalue()
    out = (tmp_path / "logs" / "tty" / "out.log").read_text()
    assert "\r" not in out and "samples/s  ETA" not in out
    drawn = [d.rstrip() for d in re.split(r"[\r\n]", raw) if d.startswith("epoch 1/1  step")]
    assert {re.fullmatch(r"epoch 1/1  step (\d+)/8 .* ETA \d+:\d\d:\d\d", d).group(1) for d in drawn} >= {"1", "8"}
    lines, current = render(raw)
    assert [l for l in lines if LOG_LINE.match(l)] == out.splitlines()
    assert current == ""
    pos = 0
    for line in out.splitlines():  # each log line starts on a fresh line or right after a wipe
        at = raw.index(line, pos)
        assert at == 0 or raw[at - 1] == "\n" or re.search(r"\r +\r$", raw[:at]), raw[max(at - 80, 0):at]
        pos = at + len(line)
    assert len(re.findall(r"Train Epoch: 0 ", out)) == 3  # steps 3, 6 and the last: the log is as before
