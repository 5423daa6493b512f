"""The shared argparse validators accept what they document and name the problem otherwise."""

from __future__ import annotations

import argparse

import pytest

from cli import validators


@pytest.mark.parametrize(
    ("validator", "text", "expected"),
    [
        (validators.positive_int, "3", 3),
        (validators.non_negative_int, "0", 0),
        (validators.power_of_two, "16", 16),
        (validators.port_number, "0", 0),
        (validators.bytes_limit, "1024", 1024),
        (validators.positive_float, "0.5", 0.5),
        (validators.non_negative_float, "0", 0.0),
        (validators.probability, "1", 1.0),
        (validators.device_name, "cuda:1", "cuda:1"),
        (validators.redis_url, "rediss://h:1/0", "rediss://h:1/0"),
    ],
)
def test_accepts(validator, text, expected) -> None:
    assert validator(text) == expected


@pytest.mark.parametrize(
    ("validator", "text", "message"),
    [
        (validators.positive_int, "0", "positive integer"),
        (validators.positive_int, "x", "must be an integer"),
        (validators.non_negative_int, "-1", ">= 0"),
        (validators.power_of_two, "12", "power of two"),
        (validators.port_number, "65536", "[0, 65535]"),
        (validators.bytes_limit, "10", "[1024, 2147483647]"),
        (validators.positive_float, "0", "> 0"),
        (validators.positive_float, "inf", "> 0"),
        (validators.non_negative_float, "-0.1", ">= 0"),
        (validators.non_negative_float, "nan", ">= 0"),
        (validators.probability, "1.5", "(0, 1]"),
        (validators.device_name, "gpu", "cuda:N"),
        (validators.redis_url, "http://x", "redis://"),
        (validators.model_dir, "/nonexistent/model", "not found"),
        (validators.existing_file, "/nonexistent/cert.pem", "not found"),
    ],
)
def test_rejects_with_a_message(validator, text, message) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message.replace("[", r"\[").replace("(", r"\(")):
        validator(text)
