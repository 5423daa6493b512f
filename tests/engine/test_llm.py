"""The offline ``engine.LLM`` API on the bundled model (float32, CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from engine.errors import InvalidRequest
from engine.llm import LLM
from engine.tokenizer import Tokenizer
from engine.worker_config import BUNDLED_MODEL_DIR

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model=str(BUNDLED_MODEL_DIR), dtype="float32", device="cpu")


def hf_greedy(prompt: list[int], max_new_tokens: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL_DIR, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt) :].tolist()


def test_the_issue_snippet(llm: LLM) -> None:
    from engine import LLM as ExportedLLM
    from engine import SamplingParams

    assert ExportedLLM is LLM
    outs = llm.generate(["Once upon a time", [1, 2, 3]], SamplingParams(max_tokens=32, temperature=0.0))
    tokenizer = Tokenizer.from_pretrained(BUNDLED_MODEL_DIR)
    assert [o.request_id for o in outs] == ["0", "1"]
    assert outs[0].prompt == "Once upon a time"
    assert outs[0].prompt_token_ids == tokenizer.encode("Once upon a time")
    assert outs[0].prompt_token_ids[0] == tokenizer.bos_token_id
    assert outs[1].prompt is None
    assert outs[1].prompt_token_ids == [1, 2, 3]
    for out in outs:
        assert len(out.outputs) == 1
        completion = out.outputs[0]
        assert completion.index == 0
        assert completion.token_ids == hf_greedy(out.prompt_token_ids, 32)
        assert completion.text == tokenizer.decode(completion.token_ids)
        assert completion.text.strip()
        ended_on_eos = completion.token_ids[-1] in tokenizer.eos_token_ids
        assert completion.finish_reason == ("stop" if ended_on_eos else "length")
        assert ended_on_eos or len(completion.token_ids) == 32


def test_prompt_shapes_and_per_prompt_params(llm: LLM) -> None:
    from engine import SamplingParams

    single_text = llm.generate("Hello world.", SamplingParams(max_tokens=3), use_tqdm=False)
    single_ids = llm.generate([0, 523, 99], SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(single_text) == 1 and single_text[0].prompt == "Hello world."
    assert len(single_ids) == 1 and single_ids[0].prompt_token_ids == [0, 523, 99]
    assert llm.generate([], use_tqdm=False) == []

    params = [SamplingParams(max_tokens=2, ignore_eos=True), SamplingParams(max_tokens=5, ignore_eos=True)]
    outs = llm.generate(["a", "b"], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 5]
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "length"]
    default = llm.generate([[0, 5]], use_tqdm=False)[0].outputs[0]
    assert default.finish_reason == "stop" or len(default.token_ids) == SamplingParams().max_tokens


def test_stop_strings_cut_the_text_and_end_the_request(llm: LLM) -> None:
    from engine import SamplingParams

    full = llm.generate("Once upon a time", SamplingParams(max_tokens=24, ignore_eos=True), use_tqdm=False)
    full_text, full_ids = full[0].outputs[0].text, full[0].outputs[0].token_ids
    stop = full_text[10:14]  # four characters that are unlikely to be one token
    cut = full_text.index(stop)
    params = SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop, "never appears"])
    completion = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0]
    assert completion.text == full_text[:cut]
    assert completion.finish_reason == "stop"
    ids = completion.token_ids
    assert ids == full_ids[: len(ids)]  # the tokens up to the one that completed the stop string
    assert stop in llm.tokenizer.decode(ids) and stop not in llm.tokenizer.decode(ids[:-1])  # type: ignore[union-attr]
    assert not llm.engine_core.has_unfinished_requests()


def test_logprobs_follow_the_tokens(llm: LLM) -> None:
    from engine import SamplingParams

    completion = llm.generate([[0, 5, 6]], SamplingParams(max_tokens=4, logprobs=2), use_tqdm=False)[
        0
    ].outputs[0]
    assert completion.logprobs is not None
    assert [lp.token_id for lp in completion.logprobs] == completion.token_ids
    for lp in completion.logprobs:
        assert len(lp.top_logprobs) == 2
        assert lp.top_logprobs[0] == (lp.token_id, lp.logprob)  # greedy: the most likely token
    plain = llm.generate([[0, 5, 6]], SamplingParams(max_tokens=4), use_tqdm=False)[0].outputs[0]
    assert plain.logprobs is None and plain.token_ids == completion.token_ids


def test_seeded_sampling_does_not_depend_on_the_batch(llm: LLM) -> None:
    from engine import SamplingParams

    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    alone = llm.generate(["The chef"], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    batched = llm.generate(["Trains", "The chef", "Music"], [others, seeded, others], use_tqdm=False)
    assert batched[1].outputs[0].token_ids == alone


def test_bad_requests_are_refused_and_leave_nothing_queued(llm: LLM) -> None:
    from engine import SamplingParams

    with pytest.raises(InvalidRequest, match="2 sampling parameters for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()], use_tqdm=False)
    with pytest.raises(InvalidRequest, match=r"ids \[4096\] are not in \[0, 4096\)"):
        llm.generate([[0, 4096]], use_tqdm=False)
    too_long = [5] * llm.max_model_len
    with pytest.raises(InvalidRequest, match="max_model_len"):
        llm.generate([[0, 5], too_long], use_tqdm=False)  # the first was queued, then aborted
    with pytest.raises(InvalidRequest, match="1 priorities for 2 prompts"):
        llm.generate(["a", "b"], SamplingParams(n=2), use_tqdm=False, priority=[0])
    with pytest.raises(InvalidRequest, match="must be a string or a list of token ids"):
        llm.generate([1.5], use_tqdm=False)  # type: ignore[list-item]
    assert not llm.engine_core.has_unfinished_requests()
    assert llm.engine_core.scheduler.kv_cache_manager.num_used_blocks == 0
    assert len(llm.generate("still works", SamplingParams(max_tokens=2), use_tqdm=False)) == 1


def test_progress_bar_reports_finished_prompts(llm: LLM, capsys: pytest.CaptureFixture[str]) -> None:
    from engine import SamplingParams

    llm.generate(["a", "b", "c"], SamplingParams(max_tokens=2, ignore_eos=True))
    err = capsys.readouterr().err
    assert "Generating: 100%" in err and "3/3" in err and "output tok/s" in err


def test_import_engine_does_not_import_torch() -> None:
    code = (
        "import sys, engine; from engine import SamplingParams; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert out.stdout.strip() == "False False"


def test_unknown_engine_attribute() -> None:
    import engine

    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        engine.Nope  # noqa: B018
