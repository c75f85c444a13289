"""What a person sees while a run trains: the Train workers post their progress to a small actor
(:func:`create_board`), and the driver draws it (:class:`Console`).

Rank 0 posts every step (at most a few times a second: :class:`Reporter`), each epoch's metrics
and the run's messages (a resume, a warning). The driver polls the board and prints:

* on a terminal, one progress bar per epoch, redrawn in place: steps, img/s, loss, accept rate,
  ETA;
* one summary line per epoch with the numbers that matter (loss, validation AUC, balanced
  accuracy at the chosen threshold, Dice, best so far); every metric is in ``history.json``;
* when stdout is not a terminal (CI, ``ray job logs``), the epoch lines only.

The driver also knows where training is, so an interrupted run can say which epoch and step it
stopped at (:attr:`Console.position`).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Optional

__all__ = ["Console", "Reporter", "create_board", "epoch_line"]

#: seconds between two step posts from rank 0 (a post is one small actor call)
POST_EVERY_S = 0.5
#: seconds between two polls of the board on the driver
POLL_S = 0.5


def _board_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self):
            self._events: list = []

        def post(self, kind: str, payload: dict) -> None:
            self._events.append((len(self._events), kind, payload))

        def since(self, seq: int) -> list:
            return self._events[seq:]

    return ProgressBoard


def create_board():
    """The progress actor (0 CPUs) of one run; its handle goes to every Train worker."""
    return _board_class().remote()


class Reporter:
    """Worker side: rank 0 posts to the board (other ranks and a missing board post nothing)."""

    def __init__(self, board, rank: int, every_s: float = POST_EVERY_S):
        self.board = board if rank == 0 else None
        self.every_s = every_s
        self._last = 0.0

    def _post(self, kind: str, payload: dict) -> None:
        if self.board is not None:
            self.board.post.remote(kind, payload)

    def step(self, epoch: int, epochs: int, step: int, steps: int, terms: dict,
             img_per_s: float) -> None:
        now = time.monotonic()
        if step + 1 < steps and now - self._last < self.every_s:
            return
        self._last = now
        self._post("step", {"epoch": epoch, "epochs": epochs, "step": step + 1,
                            "steps": steps, "img_per_s": img_per_s,
                            "loss": terms.get("loss"), "accept": terms.get("accept_rate")})

    def epoch(self, epoch: int, epochs: int, metrics: dict, best: dict) -> None:
        self._post("epoch", {"epoch": epoch, "epochs": epochs, "metrics": metrics,
                             "best": best})

    def message(self, text: str) -> None:
        self._post("message", {"text": text})


def _fmt(v: Any, spec: str = ".3f") -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "-"
    return "-" if f != f else format(f, spec)


def epoch_line(epoch: int, epochs: int, m: dict, best: Optional[dict] = None) -> str:
    """The one summary line of an epoch (fits 100 columns): the training loss, the validation
    AUC, balanced accuracy at the validation-chosen threshold and Dice, the best checkpoint's
    metric and epoch, the speed. Skipped rows get a line of their own."""
    parts = [f"epoch {epoch + 1}/{epochs}", f"loss {_fmt(m.get('train_loss'))}"]
    if "val_cls_auc" in m:
        parts.append(f"AUC {_fmt(m.get('val_cls_auc'))}")
    if "val_cls_balanced_accuracy" in m:
        thr = m.get("val_cls_threshold")
        at = f"@{_fmt(thr, '.2f')}" if thr is not None and thr == thr else ""
        parts.append(f"bal.acc {_fmt(m.get('val_cls_balanced_accuracy'))}{at}")
    if "val_seg_dice_mean" in m:
        parts.append(f"Dice {_fmt(m.get('val_seg_dice_mean'))}")
    if best:
        parts.append(f"best {_fmt(best.get('value'))} @{int(best.get('epoch', 0)) + 1}")
    parts.append(f"{_fmt(m.get('img_per_s'), '.0f')} img/s")
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Console:
    """Driver side: a thread that polls the board and prints (module docstring).

    Args:
        board: the handle of :func:`create_board`.
        out: the stream (default stdout); a terminal gets the progress bar.
    """

    def __init__(self, board, out=None, poll_s: float = POLL_S, tty: Optional[bool] = None):
        self.board = board
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.poll_s = poll_s
        self.seq = 0
        #: ``(epoch, step, steps)`` last seen (0-based epoch, steps done in it), or None
        self.position: Optional[tuple] = None
        #: epochs finished (0-based index of the last one), or None
        self.last_epoch: Optional[int] = None
        self._bar = False
        self._t_epoch: Optional[float] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Console":
        self._thread = threading.Thread(target=self._loop, name="multimix-console",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling after one last poll (so the final epoch line is printed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._end_bar()

    def _loop(self) -> None:
        while True:
            stopping = self._stop.wait(self.poll_s)
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - Ray went away: nothing more to show
                return
            if stopping:
                return

    def poll(self) -> None:
        import ray

        events = ray.get(self.board.since.remote(self.seq), timeout=30)
        for seq, kind, payload in events:
            self.seq = seq + 1
            getattr(self, f"_on_{kind}")(payload)

    # -- rendering

    def _print(self, line: str) -> None:
        self._end_bar()
        print(line, file=self.out, flush=True)

    def _end_bar(self) -> None:
        if self._bar:
            print(file=self.out, flush=True)
            self._bar = False

    def _on_message(self, p: dict) -> None:
        self._print(f"[multimix] {p['text']}")

    def _on_step(self, p: dict) -> None:
        if self.position is None or self.position[0] != p["epoch"]:
            self._t_epoch = time.monotonic()
        self.position = (p["epoch"], p["step"], p["steps"])
        if not self.tty:
            return
        done, total = p["step"], max(p["steps"], 1)
        width = 24
        fill = int(width * done / total)
        elapsed = time.monotonic() - (self._t_epoch or time.monotonic())
        eta = elapsed / done * (total - done) if done else 0.0
        accept = p.get("accept")
        line = (f"epoch {p['epoch'] + 1}/{p['epochs']} [{'#' * fill}{'.' * (width - fill)}] "
                f"{done}/{total}  loss {_fmt(p.get('loss'))}"
                + (f"  accept {_fmt(100 * accept, '.0f')}%" if accept is not None else "")
                + f"  {_fmt(p.get('img_per_s'), '.1f')} img/s  ETA {_clock(eta)}")
        print("\r" + line[:119].ljust(80), end="", file=self.out, flush=True)
        self._bar = True

    def _on_epoch(self, p: dict) -> None:
        self.last_epoch = p["epoch"]
        self.position = (p["epoch"], None, None)
        self._print(epoch_line(p["epoch"], p["epochs"], p["metrics"], p.get("best")))

    def interrupted_line(self, resume_epoch: Optional[int]) -> str:
        """``interrupted at epoch E step S; rerun the same command to resume from epoch K``
        (1-based; K: the epoch after the last one checkpointed)."""
        where = "before training started"
        if self.position is not None:
            epoch, step, steps = self.position
            where = (f"at epoch {epoch + 1} step {step}/{steps}" if step is not None
                     else f"after epoch {epoch + 1}")
        start = resume_epoch + 1 if resume_epoch is not None else 1
        return f"interrupted {where}; rerun the same command to resume from epoch {start}"
