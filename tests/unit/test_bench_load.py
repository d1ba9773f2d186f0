"""The load generator (``ops/bench/load.py``): its parent/worker exchange and the
frames its closed loop writes.

A worker answers with one JSON line holding every latency sample of its window:
hundreds of KiB, several times a pipe's capacity, so the worker blocks in the
write until the parent reads. A process stopped there (SIGSTOP, or a profiler
attaching) sees its write return early; the line must still arrive whole.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from ops.bench.load import reply_prefix, request_template
from ops.cluster.waiting import wait_for
from service import protocol

REPO_ROOT = Path(__file__).resolve().parents[2]
# What a worker of a 10 s window at a few thousand sends per second says.
SAMPLES = 60_000
# A worker's last words: the line it reads, said back.
SAY = "import json, sys\nfrom ops.bench.load import _say\n_say(json.loads(sys.stdin.readline()))"


def blocked_in_pipe_write(pid: int) -> bool:
    return "pipe_write" in Path(f"/proc/{pid}/wchan").read_text()


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_worker_answer_survives_a_stop_in_the_middle_of_its_write() -> None:
    message = {"result": True, "samples": [0.0123456] * SAMPLES}
    with subprocess.Popen(
        [sys.executable, "-c", SAY],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    ) as worker:
        assert worker.stdin is not None
        assert worker.stdout is not None
        try:
            worker.stdin.write(json.dumps(message).encode() + b"\n")
            worker.stdin.flush()
            wait_for(lambda: blocked_in_pipe_write(worker.pid), 30, "the worker to fill its pipe")
            os.kill(worker.pid, signal.SIGSTOP)
            wait_for(lambda: process_state(worker.pid) == "T", 10, "the worker to stop")
            os.kill(worker.pid, signal.SIGCONT)
            line = worker.stdout.readline()
        finally:
            worker.kill()
    assert line.endswith(b"\n"), f"the line was cut after {len(line)} bytes"
    assert json.loads(line) == message


def test_a_templated_request_is_the_frame_the_protocol_module_encodes() -> None:
    # The closed loop writes frames made from a template: each must be the very
    # frame ``encode_frame`` makes, length header included, for ids of any length.
    args = {"to": 'b\u00f6b "x"', "body": "caf\u00e9 \\ 100"}
    frame = request_template("send", args, "tok")
    for request_id in ("1", "00000187a3f1c2d4ab12cd34", "f" * 64):
        made = frame(request_id)
        assert made == protocol.encode_frame(protocol.request("send", request_id, args, "tok"))
        assert protocol.FrameDecoder().feed(made) == [
            protocol.request("send", request_id, args, "tok")
        ]


def test_the_reply_prefix_is_how_the_protocol_module_encodes_a_reply() -> None:
    # The closed loop takes a read that starts so for the reply awaited: were the
    # protocol module to encode replies otherwise, it would never see one fast.
    for request_id in ("1", "00000187a3f1c2d4ab12cd34"):
        frame = protocol.encode_frame(protocol.reply(request_id, {"message": {"id": 7}}))
        assert frame[protocol.HEADER.size :].startswith(reply_prefix(request_id))
        other = protocol.encode_frame(protocol.reply(request_id + "0", {}))
        assert not other[protocol.HEADER.size :].startswith(reply_prefix(request_id))
        error = protocol.encode_frame(protocol.error(request_id, {"code": "busy"}))
        assert not error[protocol.HEADER.size :].startswith(reply_prefix(request_id))
