"""Faults on a real Triton Inference Server: a killed stub, unload and reload under load, a corrupted
bundle, a shutdown with requests in flight.

One server for the module (explicit model control, so the repository API loads and unloads), serving
the default model on ONNX Runtime, and a short-lived one each for the killed stub and for a model whose
bundle has one byte of a graph changed (Triton 2.51 cannot shut down cleanly after either). Every answer
that succeeds is checked row by row against ONNX Runtime in this process. The shutdown test stops the
module's server: it comes last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from imagefolder.runtime.triton_server import TritonServer, stub_processes
from tests.triton_real import (
    MODEL,
    READY_DEADLINE_S,
    Reference,
    export_default_repository,
    inputs_of,
    repository_post,
    require_server,
    wait_for,
)

pytestmark = pytest.mark.xdist_group("triton_faults")  # one worker, one server, in file order
BROKEN = "broken"
GRACE_S = 30  # the server's --exit-timeout-secs: how long it lets requests in flight finish


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A work folder with ``bundle`` (the default model) and ``repo`` serving it on ONNX Runtime."""
    require_server()
    work = tmp_path_factory.mktemp("faults")
    export_default_repository(work)
    return work


@pytest.fixture(scope="module")
def served(work):
    """(server, work folder): ``MODEL`` loaded, explicit model control."""
    extra = ["--model-control-mode=explicit", f"--load-model={MODEL}", f"--exit-timeout-secs={GRACE_S}"]
    server = TritonServer(work / "repo", work / "server.log", extra=extra)
    try:
        server.start(READY_DEADLINE_S)
        yield server, work
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reference(work):
    return Reference(work / "bundle")


def ready(server: TritonServer, model: str = MODEL) -> bool:
    return server.get(f"/v2/models/{model}/ready") == 200


def model_stubs(server: TritonServer, model: str = MODEL) -> list[int]:
    return [pid for pid in stub_processes(server.repository) if stub_model(pid) == model]


def stub_model(pid: int) -> str | None:
    """The model a stub serves: its first argument is ``REPO/<model>/1/model.py``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None
    return argv[1].split(os.sep)[-3] if len(argv) > 1 else None


class Clients:
    """Client threads sending one-image requests in a loop until stopped; keeps every answer and error."""

    def __init__(self, server: TritonServer, count: int):
        import tritonclient.http as http

        self.http, self.server, self.stopped = http, server, threading.Event()
        self.answers: list[tuple[int, int, np.ndarray, np.ndarray]] = []  # (label, seed, image, indices)
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._loop, args=(k,)) for k in range(count)]

    def _loop(self, k: int) -> None:
        from tritonclient.utils import InferenceServerException

        client = self.http.InferenceServerClient(self.server.http_url, network_timeout=300)
        n = 0
        try:
            while not self.stopped.is_set():
                label, seed = (k + n) % 10, 1000 * k + n % 4
                n += 1
                try:
                    result = client.infer(MODEL, inputs_of(self.http, [label], seed=seed))
                    self.answers.append((label, seed, result.as_numpy("image"), result.as_numpy("indices")))
                except InferenceServerException as err:
                    self.errors.append(str(err.message()))
                    time.sleep(0.05)
        finally:
            client.close()

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join()

    def successes_after(self, count: int, deadline_s: float) -> None:
        start = len(self.answers)
        wait_for(lambda: len(self.answers) >= start + count, deadline_s, f"{count} answers")

    def check(self, reference: Reference) -> None:
        for label, seed, image, indices in self.answers:
            reference.check(image, indices, [label], seed=seed)


def test_a_corrupted_bundle_fails_to_load_with_our_one_line_reason(work):
    repo = work / "broken-repo"
    shutil.copytree(work / "repo" / MODEL, repo / BROKEN)
    config = repo / BROKEN / "config.pbtxt"
    config.write_text(config.read_text().replace(f'name: "{MODEL}"', f'name: "{BROKEN}"'))
    graph = repo / BROKEN / "1" / "bundle" / "sampler.onnx"
    data = bytearray(graph.read_bytes())
    graph.unlink()  # a hard link to the good bundle's file: write a new one
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    # A server of its own: Triton 2.51 counts a model that failed to load as live, and its shutdown waits
    # for it until the exit timeout.
    extra = ["--model-control-mode=explicit", "--exit-timeout-secs=1"]
    with TritonServer(repo, work / "broken.log", extra=extra) as server:
        status, body = repository_post(server, f"/models/{BROKEN}/load")
        assert status == 400 and "sampler.onnx differs from the manifest" in body and BROKEN in body, (status, body)
        _, index = repository_post(server, "/index")
        (entry,) = json.loads(index)
        assert entry["name"] == BROKEN and entry["state"] == "UNAVAILABLE"
        assert server.get(f"/v2/models/{BROKEN}/ready") != 200 and server.get("/v2/health/live") == 200
    reason = entry["reason"]
    first, _, frames = reason.partition("\n")
    assert first.startswith("Internal: BundleError: ") and first.endswith(
        "sampler.onnx differs from the manifest (sha256 or size); re-export the bundle"
    ), reason
    # The stub appends the raising frames to the reason: ours is raised afresh in initialize, one frame.
    raised_in = re.findall(r"\(\d+\): (\w+)", frames)
    assert raised_in == ["initialize"], reason
    log = server.log()
    assert f"failed to load '{BROKEN}'" in log and first.removeprefix("Internal: ") in log
    assert "Traceback" not in log and "bundle.py(" not in log


def test_killing_the_stub_under_load_then_a_reload_serves_again(work, reference):
    # A server of its own: Triton 2.51 never finishes unloading the instance whose stub died, so its
    # shutdown waits for it until the exit timeout.
    shutil.copytree(work / "repo", work / "kill-repo")
    extra = ["--model-control-mode=explicit", f"--load-model={MODEL}", "--exit-timeout-secs=1"]
    with TritonServer(work / "kill-repo", work / "kill.log", extra=extra) as server:
        (stub,) = model_stubs(server)
        with Clients(server, 3) as clients:
            clients.successes_after(3, 120)
            os.kill(stub, signal.SIGKILL)
            # 2.51 restarts no stub by itself: it answers every request with an error (no hang, no data).
            wait_for(lambda: any("is not healthy" in e for e in clients.errors), 60, "the dead stub reported")
            # A load of a loaded, unchanged model does nothing: unload, then load, starts a new stub.
            for action in ("unload", "load"):
                status, body = repository_post(server, f"/models/{MODEL}/{action}")
                assert status == 200, (action, body)
            wait_for(lambda: ready(server), READY_DEADLINE_S, "the model ready again")
            clients.successes_after(3, 120)
        assert stub not in model_stubs(server) and len(model_stubs(server)) == 1
    assert {e for e in clients.errors if MODEL not in e} == set(), clients.errors[:3]
    assert any(f"Stub process '{MODEL}_0_0' is not healthy" in e for e in clients.errors)
    clients.check(reference)  # every answer before, during and after the fault is right


def test_unload_and_reload_while_clients_send(served, reference):
    server, _ = served
    with Clients(server, 3) as clients:
        clients.successes_after(3, 120)
        status, body = repository_post(server, f"/models/{MODEL}/unload")
        assert status == 200, body
        wait_for(lambda: not ready(server), 60, "the model unloaded")
        failed = len(clients.errors)
        time.sleep(0.5)
        assert len(clients.errors) > failed  # requests to an unloaded model are refused, not hung
        status, body = repository_post(server, f"/models/{MODEL}/load")
        assert status == 200, body
        wait_for(lambda: ready(server), READY_DEADLINE_S, "the model reloaded")
        clients.successes_after(3, 120)
    assert all(MODEL in error and ("unavailable" in error or "unknown" in error) for error in clients.errors), (
        clients.errors[:3]
    )
    clients.check(reference)


def test_shutdown_finishes_the_requests_in_flight_within_the_grace_period(served, reference):
    import tritonclient.http as http

    server, _ = served  # last test of the module: it stops the server
    labels = [[(k + 3 * n) % 10 for n in range(16)] for k in range(4)]  # seconds of work in all
    answers: dict[int, tuple] = {}
    clients = [http.InferenceServerClient(server.http_url, network_timeout=300) for _ in labels]
    futures = [c.async_infer(MODEL, inputs_of(http, rows, seed=77)) for c, rows in zip(clients, labels, strict=True)]
    time.sleep(0.3)  # the requests reach the server
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    for k, future in enumerate(futures):
        result = future.get_result()
        answers[k] = (result.as_numpy("image"), result.as_numpy("indices"))
    for client in clients:
        client.close()
    assert server.process.wait(GRACE_S + 15) == 0
    assert time.monotonic() - started < GRACE_S
    for k, rows in enumerate(labels):
        reference.check(*answers[k], rows, seed=77)
    wait_for(lambda: not stub_processes(server.repository), 30, "the stubs gone")
