"""Per-token provenance over real gRPC on loopback: every finished stream marks which tokens
were accepted drafts (GenerateChunk.draft_mask) and counts the accepted drafts it cut
(cut_accepted_drafts), and the two add up to the request's accepted_drafts: greedy and
sampled, n-gram and draft model, with stop strings that cut a run of accepted drafts."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.client import cli as client
from specdec.v1 import metrics_pb2
from testkit.tiny_model import save_tiny_model
from tests.service.test_generate import collect, request
from tests.support.metrics_invariants import assert_stream_provenance

NGRAM = metrics_pb2.SPECULATION_METHOD_NGRAM
DRAFT = metrics_pb2.SPECULATION_METHOD_DRAFT_MODEL
NONE = metrics_pb2.SPECULATION_METHOD_NONE
PROMPTS = (
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(x, y):\n    return x + y\n\nprint(add(1, 2))\n",
    "Speculative decoding drafts tokens and verifies them",
)
SAMPLINGS = {"greedy": {}, "sampled": {"temperature": 0.8, "seed": 11}}


def _request(prompt: str, method: int, sampling: str, max_tokens: int = 40, **kwargs):
    req = request(prompt, max_tokens=max_tokens, method=method, k=4, **kwargs)
    for name, value in SAMPLINGS[sampling].items():
        setattr(req.sampling, name, value)
    return req


def _draft_runs(flags: list[bool]) -> Counter:
    """Lengths of the maximal runs of accepted drafts (each pass yields a_s drafts, then the
    target's token, so a run is one pass's accepted drafts)."""
    return Counter(len(list(run)) for draft, run in itertools.groupby(flags) if draft)


@pytest.fixture(scope="module")
def loopy_model_dir(tmp_path_factory):
    """A tiny model whose output cycles: n-gram lookups over it hit and get accepted."""
    return save_tiny_model(
        tmp_path_factory.mktemp("loopy-model"), seed=0, with_eos=False, attention_scale=0.0
    )


@pytest.fixture
def service(run_service, loopy_model_dir):
    # The target is its own draft model: greedy passes accept every draft, so stop strings
    # land inside runs of accepted drafts. Fixed draft lengths (no adaptive policy) keep
    # every lookup that hits proposing.
    return run_service(
        model=str(loopy_model_dir),
        draft_model=str(loopy_model_dir),
        max_batch_size=4,
        adaptive_draft_length=False,
    )


def test_every_finished_stream_accounts_for_its_accepted_drafts(service, make_stub) -> None:
    stub = make_stub(service.address)
    cases = [(p, m, s) for p in PROMPTS for m in (NGRAM, DRAFT, NONE) for s in SAMPLINGS]
    with ThreadPoolExecutor(4) as pool:  # batched together, as in production
        results = list(pool.map(lambda c: collect(stub, _request(*c)), cases))
    marked = {NGRAM: 0, DRAFT: 0}
    for (_prompt, method, sampling), (chunks, final, _) in zip(cases, results):
        m = final.metrics
        flags, cut = assert_stream_provenance(chunks, m)  # set bits + cut = accepted_drafts
        assert final.finish_reason == metrics_pb2.FINISH_REASON_LENGTH and cut == 0
        # Nothing was cut, so the runs of marked tokens are exactly the passes' accepted
        # drafts, pass by pass: the accept histogram (j >= 1).
        hist = {j: n for j, n in enumerate(m.accept_histogram) if j and n}
        assert _draft_runs(flags) == hist, (method, sampling, flags, list(m.accept_histogram))
        if method == DRAFT and sampling == "greedy":
            # Its own draft: every proposal is accepted, so every proposed draft is marked.
            assert m.accepted_drafts == m.proposed_drafts > 0
        if method in marked:
            marked[method] += sum(flags)
        else:
            assert not any(flags)
    assert marked[NGRAM] > 0 and marked[DRAFT] > 0  # both drafters' tokens were marked


def test_stop_strings_that_cut_a_run_of_drafts_count_the_cut_ones(service, make_stub) -> None:
    stub = make_stub(service.address)
    tokenizer = service.service.servicer.tokenizer
    cases = []
    for prompt, method, sampling in itertools.product(PROMPTS, (NGRAM, DRAFT), SAMPLINGS):
        chunks, final, _ = collect(stub, _request(prompt, method, sampling))
        flags, _ = assert_stream_provenance(chunks, final.metrics)
        tokens = [t for c in chunks for t in c.token_ids]
        # Stop strings that end inside a run of accepted drafts: the text through a marked
        # token followed by another marked one, so the drafts after the stop are cut.
        for i in range(3, len(tokens) - 2):
            if flags[i] and flags[i + 1]:
                through = tokenizer.decode(tokens[: i + 1])
                stop = through[-3:]
                if len(stop.strip()) == 3 and stop not in through[:-1] and "\ufffd" not in stop:
                    cases.append((prompt, method, sampling, stop))
                    break
    assert len(cases) >= 4 and {NGRAM, DRAFT} <= {method for _, method, _, _ in cases}, cases
    cut_total = 0
    for prompt, method, sampling, stop in cases:
        chunks, final, _ = collect(stub, _request(prompt, method, sampling, stop=[stop]))
        flags, cut = assert_stream_provenance(chunks, final.metrics)
        assert final.finish_reason == metrics_pb2.FINISH_REASON_STOP_SEQUENCE, (prompt, stop)
        assert len(flags) == final.completion_tokens
        assert all(c.token_ids for c in chunks)  # cut drafts ride with tokens when it succeeds
        cut_total += cut
    assert cut_total > 0  # runs were cut, and the cut drafts were counted


def test_the_client_shows_each_tokens_provenance(service, capsys) -> None:
    code = client.main(
        [
            "--target",
            service.address,
            "--method",
            "draft_model",
            "-k",
            "3",
            "--max-tokens",
            "20",
            "--json",
            "--show-drafts",
            PROMPTS[0],
        ]
    )
    assert code == 0
    # The service's log lines share the captured stdout: the client's is its one JSON object.
    (result,) = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"request_id"')
    ]
    provenance = result["provenance"]
    flags = provenance["draft_flags"]
    assert len(flags) == result["completion_tokens"] == 20
    assert flags.count("1") + provenance["cut_drafts"] == result["metrics"]["accepted_drafts"] > 0
    # Greedy with its own draft model: the prefill's token, then passes of 3 drafts and the
    # target's token (the budget's last pass proposes fewer).
    assert flags.startswith("0" + "1110" * 4)
    assert provenance["letters"].replace(" ", "") == flags.replace("1", "D").replace("0", "t")
    line = client.describe_drafts(result, color=True)
    assert "\x1b[32mD\x1b[0m" in line and f"{flags.count('1')} of 20 streamed tokens" in line


def test_the_mask_is_packed_least_significant_bit_first() -> None:
    from specdec_common.provenance import pack_draft_mask, unpack_draft_mask

    # Tokens 1, 2 and 9 of 10 were drafts: byte 0 = 0b110, byte 1 = 0b10.
    mask = 1 << 1 | 1 << 2 | 1 << 9
    assert pack_draft_mask(mask, 10) == bytes([0b110, 0b10])
    assert unpack_draft_mask(bytes([0b110, 0b10]), 10) == [i in (1, 2, 9) for i in range(10)]
    assert pack_draft_mask(0, 0) == b"" and unpack_draft_mask(b"", 0) == []
    assert pack_draft_mask(0, 8) == bytes(1) and pack_draft_mask(0, 9) == bytes(2)
    with pytest.raises(ValueError, match="outside its 3 tokens"):
        pack_draft_mask(1 << 3, 3)
    with pytest.raises(ValueError, match="2 bytes for 3 tokens"):
        unpack_draft_mask(bytes(2), 3)
    with pytest.raises(ValueError, match="past its 3 tokens"):
        unpack_draft_mask(bytes([0b1000]), 3)
