"""A real Triton Inference Server serving the default model on ONNX Runtime, asked with tritonclient.

One server for the module, started as docs/triton.md's "Serve on a CPU machine" says (its commands run as
written, on free loopback ports instead of 8000 and 8001). Every answer is checked row by row against
ONNX Runtime in this process (``tests/triton_real.py``): the tokens of each image are those it gets
alone, so an answer that is empty, short, or another row's is caught.
"""

from __future__ import annotations

import re
import shlex
import threading
from pathlib import Path

import numpy as np
import pytest

from imagefolder.core.schedule import SamplingParams
from imagefolder.runtime.triton_server import TritonServer, free_port
from tests.triton_real import (
    MODEL,
    READY_DEADLINE_S,
    SCRIPTS,
    Reference,
    inputs_of,
    require_server,
    run,
    statistics,
)

pytestmark = pytest.mark.xdist_group("triton_server")  # one worker, one server for the module
DOCS = Path(__file__).resolve().parents[1] / "docs" / "triton.md"


def cpu_section_blocks() -> tuple[list[list[str]], str]:
    """The commands of the second bash block (the first installs) and the Python block of "Serve on a CPU
    machine"."""
    section = DOCS.read_text().split("## Serve on a CPU machine", 1)[1].split("\n## ", 1)[0]
    bash = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = [line.split("  #")[0].strip() for line in bash[1].splitlines()]
    python = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return [shlex.split(line) for line in lines if line], python[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, work folder): the docs' commands run in the work folder, the last one the server."""
    require_server()
    work = tmp_path_factory.mktemp("serve")
    commands, _ = cpu_section_blocks()
    *setup, serve = commands
    for command in setup:
        run(command, work)
    assert serve[:2] == ["imagefolder", "serve"] and serve[-1] == "&", serve
    http_port, grpc_port = free_port(), free_port()
    ports = {"8000": str(http_port), "8001": str(grpc_port)}
    server = TritonServer(work / serve[2], work / "server.log")
    server.http_port, server.grpc_port = http_port, grpc_port
    server.command = [str(SCRIPTS / serve[0]), *(ports.get(arg, arg) for arg in serve[1:-1])]
    server.cwd = work
    try:
        server.start(READY_DEADLINE_S)
        yield server, work
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reference(served):
    return Reference(served[1] / "bundle")


@pytest.fixture
def http_client(served):
    import tritonclient.http as http

    client = http.InferenceServerClient(served[0].http_url, connection_timeout=300, network_timeout=300)
    yield client
    client.close()


def infer_http(client, labels, **settings) -> tuple[np.ndarray, np.ndarray]:
    import tritonclient.http as http

    result = client.infer(MODEL, inputs_of(http, labels, **settings))
    return result.as_numpy("image"), result.as_numpy("indices")


def test_the_docs_client_gets_the_tokens_of_imagefolder_generate(served, monkeypatch):
    server, work = served
    _, client_code = cpu_section_blocks()
    assert '"localhost:8000"' in client_code
    monkeypatch.chdir(work)  # where the docs' commands wrote alone.npy
    namespace: dict = {}
    exec(compile(client_code.replace('"localhost:8000"', f'"{server.http_url}"'), str(DOCS), "exec"), namespace)
    assert namespace["result"].as_numpy("indices").shape == np.load(work / "alone.npy").shape == (3, 2, 66)


def test_http_one_image_with_the_defaults(http_client, reference):
    image, indices = infer_http(http_client, [4])
    assert image.shape == (1, 3, 64, 64) and image.dtype == np.float32 and indices.dtype == np.int32
    reference.check(image, indices, [4])


def test_grpc_many_images_with_settings_per_row(served, reference):
    import tritonclient.grpc as grpc

    labels = [1, 2, 3, 1, 9, 0, 5, 7]  # rows after the first must not read the first's label
    settings = {
        "seed": [5, 5, 5, 6, 7, 8, 9, 10],
        "cfg": [3.25, 1.0, 0.0, 2.5, 4.0, 3.0, 1.5, 2.0],
        "top_k": [750, 5, 1, 40, 750, 20, 100, 2],
        "top_p": [0.95, 1.0, 0.5, 0.9, 0.8, 1.0, 0.7, 0.99],
    }
    client = grpc.InferenceServerClient(served[0].grpc_url)
    try:
        result = client.infer(MODEL, inputs_of(grpc, labels, **settings))
        image, indices = result.as_numpy("image"), result.as_numpy("indices")
    finally:
        client.close()
    reference.check(image, indices, labels, **settings)
    assert len({row.tobytes() for row in indices}) == len(labels)  # eight different images


def test_eight_concurrent_clients_each_get_what_they_get_alone_and_are_batched(served, reference):
    import tritonclient.http as http

    server = served[0]
    jobs = [([k % 10, (3 * k + 1) % 10], {"seed": 100 + k, "top_k": [5 + k, 750]}) for k in range(8)]
    for labels, settings in jobs:  # the references first, so the clients arrive together
        for row, label in enumerate(labels):
            reference.get(label, row, seed=settings["seed"], top_k=settings["top_k"][row])
    before = statistics(server)
    start, answers, errors = threading.Barrier(len(jobs)), {}, []

    def client(k: int) -> None:
        connection = http.InferenceServerClient(server.http_url, network_timeout=300)
        try:
            start.wait()
            for _ in range(2):
                answers.setdefault(k, []).append(infer_http(connection, *jobs[k][:1], **jobs[k][1]))
        except Exception as err:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(err)
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for k, (labels, settings) in enumerate(jobs):
        for image, indices in answers[k]:
            reference.check(image, indices, labels, **settings)
    inferences, executions = (now - then for now, then in zip(statistics(server), before, strict=True))
    assert inferences == 2 * 2 * len(jobs)  # Triton counts images (rows), not requests
    assert executions < 2 * len(jobs), (inferences, executions)  # the dynamic batcher merged requests


def test_bad_requests_get_an_error_naming_the_input_and_the_others_succeed(served, http_client, reference):
    import tritonclient.grpc as grpc
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    server = served[0]
    model_errors = {  # refused by our model, inside a batch that holds good requests too
        "class": (([3, 10],), {}, "class_labels: class id(s) [10] outside [0, 10)"),
        "nan cfg": (([1, 2],), {"cfg": [1.0, float("nan")]}, "row 1: cfg must be a finite number ≥ 0, got nan"),
        "top_p 0": (([5],), {"top_p": 0.0}, "row 0: top_p must be in (0, 1], got 0.0"),
    }
    good = {f"good {k}": (([k, 9 - k],), {"seed": 40 + k}, None) for k in range(3)}
    jobs = {**good, **model_errors}
    start, outcomes = threading.Barrier(len(jobs)), {}

    def client(name: str) -> None:
        args, settings, _ = jobs[name]
        connection = http.InferenceServerClient(server.http_url, network_timeout=300)
        try:
            start.wait()
            outcomes[name] = infer_http(connection, *args, **settings)
        except InferenceServerException as err:
            outcomes[name] = err
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, (args, settings, message) in jobs.items():
        if message is None:
            assert not isinstance(outcomes[name], Exception), (name, outcomes[name])
            reference.check(*outcomes[name], args[0], **settings)
        else:
            assert isinstance(outcomes[name], InferenceServerException), name
            assert message in str(outcomes[name].message()), (name, outcomes[name].message())

    # Refused by Triton itself, before the model: each names what is wrong.
    labels = np.zeros((2, 1), np.float32)
    wrong_dtype = grpc.InferInput("class_labels", [2, 1], "FP32")
    wrong_dtype.set_data_from_numpy(labels)
    seed_only = inputs_of(grpc, [0, 0], seed=1)[1]
    too_many = inputs_of(grpc, [0] * 65)  # max_batch_size is 64
    client = grpc.InferenceServerClient(server.grpc_url)
    try:
        for inputs, words in (
            ([wrong_dtype], ["class_labels", "FP32", "INT64"]),
            ([seed_only], ["class_labels"]),
            (too_many, ["batch-size must be <= 64"]),
        ):
            with pytest.raises(InferenceServerException) as refused:
                client.infer(MODEL, inputs)
            assert all(word in refused.value.message() for word in words), refused.value.message()
        assert client.is_server_ready() and client.is_model_ready(MODEL)
    finally:
        client.close()
    image, indices = infer_http(http_client, [6], seed=3)  # and it still serves
    reference.check(image, indices, [6], seed=3)


def test_conditioned_rows_get_what_they_get_alone_and_others_are_unchanged(served, http_client, reference):
    """Schema 5's optional inputs on the real server: a row forced to a reference's first scales keeps those
    tokens and matches in-process generation with the same reference; a row with an empty mask gets its
    unconditioned tokens."""
    from imagefolder.runtime.loop import ImageRequest, Reference, run_batch

    _, ref_indices = reference.get(2, 0, seed=11)  # the reference: an image generated in-process
    positions = ref_indices.shape[1]
    first_scales = 1 + 4 + 9  # scales 1, 2 and 3 of the default model
    mask = np.zeros((2, positions, 2), np.bool_)
    mask[0, :first_scales] = True
    references = np.stack([ref_indices, ref_indices])
    image, indices = infer_http(http_client, [5, 7], seed=3, reference_indices=references, force_mask=mask)
    np.testing.assert_array_equal(indices[0][:, :first_scales], ref_indices[:, :first_scales])
    conditioned = ImageRequest(5, SamplingParams(seed=3), 0, Reference(ref_indices, mask[0]))
    alone = run_batch(reference.session, reference.backend.scales, [conditioned])
    np.testing.assert_array_equal(indices[0], alone.indices[0])
    np.testing.assert_allclose(image[0], alone.images[0], atol=1e-5)
    want_image, want_indices = reference.get(7, 1, seed=3)  # row 1, nothing forced: its unconditioned tokens
    np.testing.assert_array_equal(indices[1], want_indices)
    np.testing.assert_allclose(image[1], want_image, atol=1e-5)
