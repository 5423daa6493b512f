from engine.request import Request, RequestStatus, finish_reason
from engine.sampling_params import SamplingParams


def make(max_tokens=4, ignore_eos=False, max_model_len=None):
    return Request(
        "r",
        [1, 2, 3],
        SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos),
        eos_token_ids=(0, 9),
        max_model_len=max_model_len,
    )


def test_token_views():
    req = make()
    req.output_token_ids = [4, 5]
    assert req.all_token_ids == [1, 2, 3, 4, 5]
    assert req.num_tokens == 5 and req.num_prompt_tokens == 3
    assert req.token_ids_between(0, 2) == [1, 2]
    assert req.token_ids_between(2, 5) == [3, 4, 5]
    assert req.token_ids_between(4, 5) == [5]


def test_check_stop_eos():
    req = make()
    req.append_output_token(5)
    assert not req.check_stop() and req.status is RequestStatus.WAITING
    req.append_output_token(9)
    assert req.check_stop() and req.status is RequestStatus.FINISHED_STOPPED


def test_check_stop_ignore_eos_and_max_tokens():
    req = make(max_tokens=2, ignore_eos=True)
    req.append_output_token(0)
    assert not req.check_stop()
    req.append_output_token(0)
    assert req.check_stop() and req.status is RequestStatus.FINISHED_LENGTH


def test_eos_on_last_allowed_token_reports_stop():
    req = make(max_tokens=1)
    req.append_output_token(0)
    assert req.check_stop() and finish_reason(req.status) == "stop"


def test_check_stop_max_model_len():
    req = make(max_tokens=10, max_model_len=5)
    req.append_output_token(4)
    assert not req.check_stop()
    req.append_output_token(4)
    assert req.check_stop() and req.status is RequestStatus.FINISHED_LENGTH


def test_finish_reason_strings():
    assert [finish_reason(s) for s in RequestStatus] == [None, None, None, "stop", "length", "abort"]
    assert [s.is_finished for s in RequestStatus] == [False, False, False, True, True, True]
